#!/bin/sh
# Set up vmrt on a fresh Debian 12 (x86_64) machine, as root:
# Debian packages, the Python package (in .venv, linked as /usr/local/bin/vmrt),
# the guest kernel, the guest agent and the project's images. Idempotent;
# the kernel and agent builds are cached under /var/cache/vmrt.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root" >&2
    exit 1
fi

PACKAGES="qemu-system-x86 e2fsprogs runc golang-github-containers-common linux-source-6.1 busybox-static \
  make gcc libc6-dev linux-libc-dev libseccomp2 flex bison bc patch libelf-dev libssl-dev cpio xz-utils \
  python3 python3-venv clang libclang-rt-14-dev \
  docker-registry skopeo zstd apache2-utils openssl nftables mmdebstrap docker.io docker-compose \
  podman conmon buildah \
  openssh-server openssh-client libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "[setup] installing Debian packages:$missing" >&2
    apt-get update -q
    # no service starts from these packages: Debian's dockerd, containerd and registry would
    # answer on their default sockets and ports; vmrt's tests start their own, privately
    # (policy-rc.d: Debian's way to keep invoke-rc.d and deb-systemd-invoke from starting them)
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then  # and none starts at boot
        systemctl disable --now docker.service docker.socket containerd.service podman.service podman.socket \
            >/dev/null 2>&1 || true
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -e '.[test,bench,libvirt]' --config-settings editable_mode=compat  # a .pth, no import hook
# byte-compile now: vmrt is a CLI started once per container, and PYTHONDONTWRITEBYTECODE
# would otherwise make every start recompile every module
.venv/bin/python -m compileall -q vmrt .venv/lib/python3*/site-packages >/dev/null || true
ln -sf "$PWD/.venv/bin/vmrt" /usr/local/bin/vmrt
# vmrt-runtime, the OCI runtime engines are given: they run it 3+ times per container, so its
# launcher starts Python without site or the environment (-IS: ~9 ms less than pip's console
# script); what needs more than the standard library (the VM side) loads site itself
cat > /usr/local/bin/vmrt-runtime.new <<LAUNCHER
#!$PWD/.venv/bin/python -IS
import sys
sys.path[:0] = ["$PWD"]
from vmrt.ociruntime import main
sys.exit(main())
LAUNCHER
chmod 755 /usr/local/bin/vmrt-runtime.new
mv -f /usr/local/bin/vmrt-runtime.new /usr/local/bin/vmrt-runtime

vmrt setup
vmrt info
