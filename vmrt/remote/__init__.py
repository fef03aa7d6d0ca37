"""Remote hosts over SSH: ``vmrt -H ssh://[user@]host[:port] ...``, ``VMRT_HOST`` and contexts.

A command for a remote host runs the remote machine's own ``vmrt`` CLI over an SSH exec channel
(paramiko), with stdin, stdout, stderr, a tty, signals and the exit status carried over:

    target    ssh:// URLs (strict), where a command goes (-H, --context, VMRT_HOST,
              VMRT_CONTEXT, the current context): no paramiko, read on every start
    contexts  the named hosts (``vmrt context``), root-only files in the user's config dir
    session   the remote end: ``vmrt --remote-session=framed ...`` forks; the parent reads
              the client's frames (stdin data, its end, signals) and stops the command when
              the connection goes (SIGHUP, then SIGTERM; SIGKILL as a last resort)
    client    the local end (paramiko): host keys against known_hosts, keys from the agent
              or ~/.ssh (never a password), ProxyJump hosts, the channel's relay, files for
              cp/load/save
    localfiles  local files a command names, read here: build's context (a tar, .dockerignore
              applied, no link followed), --env-file
    mux       the per-user connection master (as ssh's ControlMaster)

paramiko is imported only by :mod:`.client`, and only when a command goes to a remote host.
"""
