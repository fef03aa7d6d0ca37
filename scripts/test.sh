#!/bin/sh
# Run vmrt's whole test suite (sets up first; real QEMU boots under TCG or KVM).
# pytest's own exit status is returned unchanged (5 = no tests collected).
set -eu
cd "$(dirname "$0")/.."
./setup.sh >&2
# The examples' images (examples/, tests/test_examples.py), built here with process isolation
# where their RUN steps may download Debian's packages (the tests themselves stay on loopback);
# a second run is the build cache's hit. VMRT_EXAMPLES_BUILT tells the tests they must be there:
# an example that does not build fails its tests, not the whole run.
.venv/bin/python -m vmrt image build images/debian >&2 || echo "scripts/test.sh: images/debian did not build" >&2
for ex in tomcat mariadb; do
    .venv/bin/python -m vmrt build --isolation=process -t "vmrt-examples/$ex:latest" "examples/$ex" >&2 ||
        echo "scripts/test.sh: examples/$ex did not build (tests/test_examples.py fails)" >&2
done
export VMRT_EXAMPLES_BUILT=1
exec .venv/bin/python -m pytest -ra "$@"
