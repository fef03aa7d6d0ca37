"""What runs inside the containers (and on the host beside them): the sizes of the workloads,
the I/O, CPU and net scripts, and the reading of the marker lines the scripts print."""

from __future__ import annotations

from typing import Any

REPS = 3                 # io and cpu: one container per repetition and mode, interleaved; net: transfers
IO_MIB = 64              # sequential write/read size
IMAGE_READS = 16         # sequential reads of a file from the image
META_FILES = 1000        # small-file create / stat / delete
STAT_PASSES = 10         # stat is fast: time 10 passes over the files, so the span dwarfs the timer's jitter
CPU_ITERS = 1_000_000    # awk loop iterations
SYSCALL_BYTES = 200_000  # dd bs=1: one read + one write per byte
NET_MIB = 64             # net: MiB sent per throughput repetition (--net-mib)
NET_REQUESTS = 200       # net: HTTP GETs per path (--net-requests)
NET_FILE_BYTES = 1024    # net: the file httpd serves
NET_WARMUP_MIB = 8       # net: a discarded transfer (at most this size) and NET_WARMUP_GETS GETs first
NET_WARMUP_GETS = 5
NET_SINK_PORT, NET_HTTP_PORT = 5001, 8080  # in the container

# The I/O script: markers ("@B name" / "@E name") timed on the host as the lines arrive.
IO_SCRIPT = f"""
W=$1; T=$2; IMG=$3
echo "@S imgsize $(wc -c < "$IMG")"
sed 's/^/@M /' /proc/mounts
for d in "$W" "$T"; do
  mkdir -p "$d"
  if [ "$d" = "$W" ]; then k=root; else k=tmp; fi
  echo "@B write_$k"; dd if=/dev/zero of="$d/seq" bs=1M count={IO_MIB} conv=fsync 2>/dev/null; echo "@E write_$k"
  echo "@B read_$k"; dd if="$d/seq" of=/dev/null bs=1M 2>/dev/null; echo "@E read_$k"
  rm -f "$d/seq"
done
echo "@B image_first"; dd if="$IMG" of=/dev/null bs=1M 2>/dev/null; echo "@E image_first"
echo "@B image_read"
i=0; while [ $i -lt {IMAGE_READS} ]; do dd if="$IMG" bs=1M 2>/dev/null; i=$((i+1)); done >/dev/null
echo "@E image_read"
cp "$IMG" /dev/shm/bench-img && dd if=/dev/shm/bench-img of=/dev/null bs=1M 2>/dev/null
echo "@B shm_read"
i=0; while [ $i -lt {IMAGE_READS} ]; do dd if=/dev/shm/bench-img bs=1M 2>/dev/null; i=$((i+1)); done >/dev/null
echo "@E shm_read"; rm -f /dev/shm/bench-img
cd "$W"
echo "@B loop_empty"; i=0; while [ $i -lt {META_FILES * STAT_PASSES} ]; do i=$((i+1)); done; echo "@E loop_empty"
echo "@B create"; i=0; while [ $i -lt {META_FILES} ]; do : > f$i; i=$((i+1)); done; echo "@E create"
echo "@B stat"
p=0; while [ $p -lt {STAT_PASSES} ]; do
  i=0; while [ $i -lt {META_FILES} ]; do [ -e f$i ] || echo "@X missing f$i"; i=$((i+1)); done; p=$((p+1))
done
echo "@E stat"
echo "@B delete"; rm -f f*; echo "@E delete"
echo "@D"
"""
CPU_SCRIPT = f"""
echo "@B cpu"; awk 'BEGIN {{ s = 0; for (i = 0; i < {CPU_ITERS}; i++) s += i % 7; print s }}' >/dev/null; echo "@E cpu"
echo "@B syscall"; dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} 2>/dev/null; echo "@E syscall"
echo "@D"
"""
# net: the TCP sink, accepting one connection after another. Its stdin is a FIFO held open
# read-write (never readable, never EOF): busybox nc shuts its sending side down as soon as its
# stdin reaches EOF (at once with /dev/null), and the client would see EOF before the sink had
# read everything. With the FIFO, nc exits (closing the connection) only when it reads EOF from
# the client, so the client's EOF marks the end of the transfer. Args: FIFO PORT [LISTEN-ADDRESS].
NET_SINK = 'rm -f "$1"; mkfifo "$1" && exec 3<>"$1" || exit 1\nwhile true; do nc -l -p "$2" $3 <&3 >/dev/null; done'
NET_SERVE = (f"mkdir -p /www && dd if=/dev/zero of=/www/index.html bs={NET_FILE_BYTES} count=1 2>/dev/null "
             f"|| exit 1\nhttpd -f -p {NET_HTTP_PORT} -h /www &\n{NET_SINK}")
HOST_APPLETS = ("sh", "awk", "dd", "cat", "rm", "mkdir", "sed", "wc", "sleep", "nc", "mkfifo", "httpd")


def parse_marked(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """A script's timestamped output lines: spans between @B/@E markers, @M mounts, @S info,
    @X problems, and whether it got to @D (done)."""
    begin: dict[str, float] = {}
    out: dict[str, Any] = {"t": {}, "mounts": [], "info": {}, "done": False, "problems": []}
    for t, line in lines:
        if line.startswith("@B "):
            begin[line[3:]] = t
        elif line.startswith("@E ") and line[3:] in begin:
            out["t"][line[3:]] = t - begin[line[3:]]
        elif line.startswith("@M "):
            f = line.split()
            if len(f) >= 4:
                out["mounts"].append((f[2], f[3]))
        elif line.startswith("@S "):
            _, k, v = (line.split(maxsplit=2) + ["", ""])[:3]
            out["info"][k] = v.strip()
        elif line.startswith("@X "):
            out["problems"].append(line[3:])
        elif line == "@D":
            out["done"] = True
    return out


def fs_of(path: str, mounts: list[tuple[str, str]]) -> str:
    """The file system type of the mount ``path`` is on, from (mount point, type) pairs."""
    best, kind = "", "?"
    for mp, fstype in mounts:
        prefix = mp.rstrip("/") + "/"
        if (path + "/").startswith(prefix) and len(mp) >= len(best):
            best, kind = mp, fstype
    return kind
