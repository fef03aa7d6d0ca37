"""The signal sets every owner of a container agrees on (defined once).

``FORWARDED``: what `vmrt run`, a monitor or `vmrt exec` passes on to the container's
process. ``STOP_SIGNALS``: those of them that ask it to stop (a second one, or none obeyed
within ``stop_grace``, kills it). ``FORCE_KILL``: what `vmrt kill -s KILL` (and `stop` after
its grace time) sends a detached container's monitor — SIGKILL itself would kill the
monitor, not the container.
"""

from __future__ import annotations

import signal

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_KILL = signal.SIGRTMIN + 3
