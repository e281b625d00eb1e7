"""The function runtime's side: checkpoint format, loaders, node loader sidecar, model, server, local mode."""
