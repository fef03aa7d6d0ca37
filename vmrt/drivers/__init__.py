"""Isolation drivers. Each consumes the same OCI bundle (vmrt.bundle)."""
