"""Host side of the guest-agent protocol (docs/agent-protocol.md)."""
