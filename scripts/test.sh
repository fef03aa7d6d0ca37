#!/bin/sh
# Run vmrt's whole test suite (sets up first; real QEMU boots under TCG or KVM).
# pytest's own exit status is returned unchanged (5 = no tests collected).
set -eu
cd "$(dirname "$0")/.."
./setup.sh >&2
exec .venv/bin/python -m pytest -ra "$@"
