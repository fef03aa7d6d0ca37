"""The warm pool: pre-booted micro-VMs waiting, agent ready, for a container (as Kata's VMCache).

``vmrt pool start`` runs the pool daemon (``vmrt pool serve`` in its own session, in the
background; ``vmrt pool stop`` ends it and kills its idle VMs). It keeps ``pool_size``
VMs of the default shape (memory, vCPUs, machine, kernel, initramfs, accelerator) booted
up to the agent's HELLO, each with its own virtiofsd serving an empty share directory;
or, where a valid snapshot of that shape exists, restored from it, each with its own 9p
proxy helper (vmrt/snapshot.py). ``vmrt run`` in VM mode asks it, over
``<run_root>/pool.sock``, for a VM of the container's shape: the daemon moves that VM's
directory into the container's run dir, passes the agent and console channels
(SCM_RIGHTS) and forgets the VM. From then on the VM belongs to that one container and
dies with it: a VM is never reused, so no data crosses tenants. The container's rootfs
is mounted into the share only after the claim; the share is a shared mount, so the new
mount propagates into virtiofsd's mount namespace (a read-only overlay: read-only there
too). The daemon boots a replacement at once. No daemon, no ready VM of the right shape,
or ``VMRT_POOL=off``: ``vmrt run`` restores a VM of its own from the snapshot, or boots one.

The daemon is the parent of its VMs' QEMU and virtiofsd, also after a claim: it
reaps them and writes each one's exit status to ``<vm dir>/<name>.status``, where the
container's owner (watching them through pidfds) reads it. They are started without
a parent-death signal, so stopping the daemon never touches a claimed VM.

The package: :mod:`.client` (what ``vmrt run`` and ``vmrt pool ...`` do: claim a VM,
talk to the daemon, start and stop it), :mod:`.daemon` (the daemon that boots and
hands out VMs) and :mod:`.files` (what both read on disk: the pool directory, a VM's
marker, the daemon's PID record). A claim needs nothing of the daemon: ``vmrt run``
imports only the client.
"""
