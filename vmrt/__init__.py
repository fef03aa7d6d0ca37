"""vmrt: containers with a per-run choice of process or micro-VM isolation."""

__version__ = "0.1.0"
