#!/bin/sh
# Pack what a KVM timing run needs on a machine without Debian's QEMU:
# QEMU + virtiofsd with every shared library and the dynamic loader, the
# microvm firmware, vmrt's kernel and agent initramfs, the busybox layer, and
# the pure-Python dependencies. Output: .device/bundle.tar.xz (git-ignored).
set -eu
cd "$(dirname "$0")/.."
out=.device/stage
rm -rf .device && mkdir -p $out/bin $out/lib $out/share $out/py $out/cache $out/modules
cp /usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so $out/modules/
cp /usr/bin/qemu-system-x86_64 /usr/lib/qemu/virtiofsd $out/bin/
for b in /usr/bin/qemu-system-x86_64 /usr/lib/qemu/virtiofsd; do
    ldd "$b" | grep -o '/[^ ]*' | while read -r l; do cp -L "$l" $out/lib/; done
done
cp /bin/busybox $out/busybox
cp /usr/share/qemu/bios-microvm.bin /usr/share/qemu/qboot.rom /usr/share/qemu/pvh.bin \
   /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin $out/share/
cp -r "$(.venv/bin/python -c 'import click, os; print(os.path.dirname(click.__file__))')" $out/py/
cp -r "$(.venv/bin/python -c 'import qemu.qmp, os; print(os.path.dirname(os.path.dirname(qemu.qmp.__file__)))')" $out/py/
vmrt_cache=${VMRT_CACHE:-/var/cache/vmrt}
k=$(.venv/bin/python -c 'from vmrt import kernel, config; print(kernel.kernel_dir(config.load()))')
a=$(.venv/bin/python -c 'from vmrt import agentbuild, config; print(agentbuild.agent_dir(config.load()))')
mkdir -p "$out/cache/kernels/$(basename "$k")" "$out/cache/agent/$(basename "$a")"
cp "$k/vmlinux" "$k/config" "$k/build.json" "$out/cache/kernels/$(basename "$k")/"
.venv/bin/python - "$out/bootonly.cpio" <<'PY'
# an initramfs whose init only announces itself and reboots: boot time without vmrt
import sys
from vmrt.agentbuild import Cpio
c = Cpio()
for d in ("dev", "proc", "bin"):
    c.dir(d)
c.chardev("dev/console", 5, 1)
c.file("bin/busybox", open("/bin/busybox", "rb").read())
c.file("init", b"#!/bin/busybox sh\n/bin/busybox echo vmrt-agent: init\n/bin/busybox reboot -f\n")
open(sys.argv[1], "wb").write(c.finish())
PY
cp "$a/initramfs.cpio" "$out/cache/agent/$(basename "$a")/"
cat > $out/bin/qemu <<'W'
#!/bin/sh
D=$(dirname "$(dirname "$(readlink -f "$0")")")
export QEMU_MODULE_DIR="$D/modules"
exec "$D/lib/ld-linux-x86-64.so.2" --library-path "$D/lib" "$D/bin/qemu-system-x86_64" -L "$D/share" "$@"
W
cat > $out/bin/vfsd <<'W'
#!/bin/sh
D=$(dirname "$(dirname "$(readlink -f "$0")")")
exec "$D/lib/ld-linux-x86-64.so.2" --library-path "$D/lib" "$D/bin/virtiofsd" "$@"
W
chmod +x $out/bin/qemu $out/bin/vfsd
tar -C .device -cJf .device/bundle.tar.xz stage
rm -rf $out
ls -la .device/bundle.tar.xz
