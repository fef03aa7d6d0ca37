"""Micro-VM plumbing: accelerator choice, QEMU, virtiofsd."""
