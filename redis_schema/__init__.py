"""The Redis key space of sllm-faas (see docs/ARCHITECTURE.md; planned)."""
