"""sllm-faas placement controller (see docs/ARCHITECTURE.md; planned)."""
