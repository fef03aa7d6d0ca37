#!/bin/sh
# KVM boot timings on a lent machine with real /dev/kvm, from .device/bundle.tar.xz
# (made by benchmarks/portable_bundle.sh). Results go to $OUT (or /tmp/out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > "$OUT/log.txt" 2>&1
echo "== host"; uname -r; id -u; nproc; grep -m1 "model name" /proc/cpuinfo; ls -la /dev/kvm
ls -d /sys/module/kvm* 2>/dev/null; command -v python3 && python3 --version
T=$(mktemp -d); tar -C "$T" -xJf .device/bundle.tar.xz; D=$T/stage
K=$(ls -d "$D"/cache/kernels/*/vmlinux); I=$(ls "$D"/cache/agent/*/initramfs.cpio)
echo "== raw boot (QEMU start -> guest init -> reboot), 10 each"
for accel in kvm tcg; do
  for i in 1 2 3 4 5 6 7 8 9 10; do
    s=$(date +%s%N)
    timeout 60 "$D/bin/qemu" -M microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off \
      -accel $accel -cpu $( [ $accel = kvm ] && echo host || echo max ) -m 256M -nodefaults -no-user-config \
      -display none -no-reboot -kernel "$K" -initrd "$D/bootonly.cpio" \
      -append "console=ttyS0 quiet reboot=t panic=-1 pci=off" -serial stdio > "$T/con.txt" 2>&1
    rc=$?; e=$(date +%s%N)
    echo "$accel run $i: $(( (e - s) / 1000000 )) ms rc=$rc init-seen=$(grep -c 'vmrt-agent: init' "$T/con.txt")"
  done
done
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  export PYTHONPATH="$D/py:$PWD" VMRT_QEMU="$D/bin/qemu" VMRT_VIRTIOFSD="$D/bin/vfsd" \
         VMRT_KERNEL="$K" VMRT_INITRD="$I" VMRT_ROOT="$T/root" VMRT_RUN_ROOT="$T/run" VMRT_CACHE="$D/cache"
  python3 -m vmrt image build images/busybox
  python3 -m vmrt info
  for accel in kvm tcg; do
    python3 -m vmrt run --rm --accel=$accel --timings busybox sh -c 'echo hello; uname -r; exit 3'; echo "rc=$?"
  done
  timeout 300 python3 benchmarks/coldstart.py --accel kvm --runs 20 --mem-samples 3 --write "$OUT/BENCH_kvm.md" > "$OUT/bench_kvm.json"
  echo "bench rc=$?"
fi
rm -rf "$T"
