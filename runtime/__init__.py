"""sllm-faas runtime: checkpoint format, loaders, node loader sidecar and the function runtime."""

__version__ = "0.1.0"
