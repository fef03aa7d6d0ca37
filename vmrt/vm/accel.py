"""Choose the accelerator: KVM on real hardware virtualization, TCG otherwise.

PVM (a shadow-paging KVM for nested use) answers KVM_CREATE_VM like real KVM
but only boots guests built with CONFIG_PVM_GUEST; it is recognised from
``/sys/module/kvm_pvm`` or KVM's paravirt CPUID signature and explained.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import os
import struct

from ..errors import UsageError

KVM_GET_API_VERSION = 0xAE00
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
_ENTRY = struct.Struct("<IIIIIIIIII")  # function index flags eax ebx ecx edx pad[3]
PVM_SIGNATURES = (0x4D5650, 0x6D7670)
# QEMU's emulated local APIC counts at 1 GHz; the project's kernel ticks at CONFIG_HZ=100
# (kernels/vmrt.config) and takes this rate, in bus clocks per jiffy, from the boot parameter
# its patch adds (kernels/patches/0001-x86-apic-lapic_timer_period.patch)
QEMU_APIC_HZ = 1_000_000_000
GUEST_HZ = 100


@dataclasses.dataclass(frozen=True)
class Accel:
    name: str          # "kvm" or "tcg"
    host_kind: str     # "kvm", "pvm" or "none"
    reason: str        # one line explaining the choice
    user_kernel: bool = False  # --kernel / kernel=: not the project's build (none of its boot parameters)

    def qemu_args(self, tb_size_mib: int = 0) -> list[str]:
        if self.name == "kvm":
            cpu = "host,-arch-capabilities" if self.host_kind == "pvm" else "host"
            return ["-accel", "kvm", "-cpu", cpu]
        tb = f",tb-size={tb_size_mib}" if tb_size_mib else ""
        return ["-accel", f"tcg,thread=multi{tb}", "-cpu", "max"]

    def kernel_args(self) -> str:
        """Under TCG the guest TSC ticks at the host's rate and the APIC timer at QEMU's: say so,
        skipping both calibrations (the APIC's, against the PIT, is ~250 ms of a TCG boot)."""
        if self.name != "tcg":
            return ""
        khz = host_tsc_khz()
        args = [f"tsc_early_khz={khz}"] if khz else []
        if not self.user_kernel:
            args.append(f"lapic_timer_period={QEMU_APIC_HZ // GUEST_HZ}")
        return " ".join(args)


def host_tsc_khz() -> int:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def _pvm_cpuid(fd: int) -> bool:
    n = 256
    buf = array.array("B", struct.pack("<II", n, 0) + bytes(_ENTRY.size * n))
    try:
        fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
    except OSError:
        return False
    raw = buf.tobytes()
    (nent,) = struct.unpack_from("<I", raw)
    for i in range(min(nent, n)):
        func, _idx, _fl, _eax, ebx, *_ = _ENTRY.unpack_from(raw, 8 + i * _ENTRY.size)
        if func == 0x40000002 and ebx in PVM_SIGNATURES:
            return True
    return False


def probe_host(dev: str = "/dev/kvm") -> str:
    """'kvm' (usable), 'pvm' (PVM hypervisor) or 'none'."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "pvm"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "none"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return "none"
        return "pvm" if _pvm_cpuid(fd) else "kvm"
    except OSError:
        return "none"
    finally:
        os.close(fd)


def choose(requested: str, *, user_kernel: bool) -> Accel:
    host = probe_host()
    requested = requested.lower()
    if requested not in ("auto", "kvm", "tcg"):
        raise UsageError(f"invalid accelerator {requested!r}: use auto, kvm or tcg")
    if requested == "tcg":
        return Accel("tcg", host, "TCG requested", user_kernel)
    if requested == "kvm":
        if host == "none":
            raise UsageError("--accel=kvm: /dev/kvm is missing or unusable on this host")
        if host == "pvm" and not user_kernel:
            raise UsageError("--accel=kvm: /dev/kvm is PVM, which only boots kernels built with "
                             "CONFIG_PVM_GUEST; pass --kernel with such a kernel")
        return Accel("kvm", host, f"KVM requested ({host})", user_kernel)
    if host == "kvm":
        return Accel("kvm", host, "hardware virtualization via /dev/kvm", user_kernel)
    if host == "pvm":
        return Accel("tcg", host,
                     "/dev/kvm is PVM (needs a CONFIG_PVM_GUEST kernel: use --kernel and --accel=kvm); "
                     "using TCG software emulation", user_kernel)
    return Accel("tcg", host, "no usable /dev/kvm; using TCG software emulation (slower)", user_kernel)
