"""The Docker Engine API (``vmrt system service``): what the ``docker`` CLI, docker-compose
and the Docker SDK speak, served on a unix socket by a long-lived process.

The service sits beside the CLI at the top of the layers: every request becomes a call of
the commands layer (:mod:`vmrt.containercmds`, :mod:`vmrt.imagecmds`, ...), so a container
it starts is the one ``vmrt ps`` shows, and the other way round (one state). Containers are
run as ``vmrt run -d`` runs them: each has its own monitor, which owns it, so the service
can stop or die without taking a container along.

:mod:`.server`: the socket, the version negotiation (``/_ping``, ``API-Version``, the
``/vX.Y/`` prefix), routing, errors as Docker's ``{"message": ...}`` with its status codes.
:mod:`.system`, :mod:`.containers`, :mod:`.images`: the endpoints. :mod:`.streams`:
Docker's multiplexed stdout/stderr frames.
"""
