"""``vmrt bench``: start, exec, memory, density, I/O, CPU and network, every mode side by side.

The benchmark drives the real command line, as a user would, and measures from
the host with CLOCK_MONOTONIC (``time.perf_counter``). Modes:

  process      vmrt run --rm --isolation=process IMAGE true
  vm-cold      vmrt run --rm --isolation=vm IMAGE true, with VMRT_POOL=off
  vm-pool      the same with a warm pool (``vmrt pool start``; refilled between runs)
  vm-snapshot  the same restored from a snapshot (``vmrt snapshot build`` first; VMRT_POOL=off)
  vm-default   what a user gets with no extra command and a warm cache: VMRT_POOL and VMRT_SNAPSHOT
               unset (snapshot = auto), after one run that started the background snapshot build
  runc         runc run of a bundle with the config.json vmrt writes for the image
  podman       podman run --rm --network none IMAGE true (the image loaded from vmrt's store)

The vmrt modes' containers of start, exec, memory, density, I/O and CPU run with
``--network none`` by default (as the podman baseline does); ``--network bridge``
measures them on the default bridge network instead (veth or tap, nftables
rules). The network used is recorded in the JSON and printed with the tables.

The ``net`` metric always uses the default bridge network: one detached container
per mode (process, vm-cold) publishes a busybox httpd (a 1 KiB file) and a busybox
nc sink on 127.0.0.1 (``-p``: nftables DNAT), and the host measures, through those
ports, TCP throughput (``--net-mib`` MiB sent, from connect to the sink's EOF) and
the latency of HTTP GETs on a new connection each (``--net-requests``). The same
two servers run on the host itself (host busybox, 127.0.0.1) as the
``host-loopback`` baseline, measured in the same run by the same client code.
A pooled or snapshot-restored VM has the same data path as a cold one, so only
vm-cold is measured.

Runs are interleaved mode by mode within each round (the order rotates), one
warm-up round is discarded, and figures are medians with p90/p99. Every
figure carries the setup it was measured with (accelerator, machine, guest
memory, vCPUs, kernel build id, virtio-fs cache mode). Methodology:
shared/reference/benchmarks.md. A benchmark measures and reports; it never
asserts a time.

The package, from the top (no module imports one above it):

  command     `vmrt bench` itself: options, the run, the document written and shown
  metrics     the Bench: each metric over the modes, interleaved; the JSON document
  modes       process, vm-cold, vm-pool, vm-snapshot, vm-default, runc, podman behind one interface
  report      the terminal tables and the markdown section; plots: the PNGs
  netclient   the net metric's client (throughput, HTTP latency), the same for every path
  procs       the child processes: timed, tracked, stopped on an interrupt
  sampling    /proc/meminfo, the process table, PSS per host process
  workloads   the workloads' sizes, the I/O, CPU and net scripts, their marker lines
  figures     percentiles, summaries, the rotating order; errors: BenchError
"""

from .command import main
from .errors import BenchError
from .figures import pct, rotate, summary
from .metrics import METRICS, Bench
from .modes import MODES
from .workloads import NET_FILE_BYTES, REPS, fs_of, parse_marked

__all__ = ["METRICS", "MODES", "NET_FILE_BYTES", "REPS", "Bench", "BenchError", "fs_of", "main", "parse_marked",
           "pct", "rotate", "summary"]
