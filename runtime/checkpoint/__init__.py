"""The sllm checkpoint format: spec in docs/FORMAT.md.

    from sllm_faas.runtime.checkpoint import convert, save_state_dict, read_manifest, verify
    from sllm_faas.runtime.loader import load          # tensors, as views into one buffer per partition
"""

from sllm_faas.runtime.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    PartitionEntry,
    TensorEntry,
    read_manifest,
)
from sllm_faas.runtime.checkpoint.verify import verify

_WRITER = ("DEFAULT_PARTITION_SIZE", "convert", "save_state_dict", "write_checkpoint")


def __getattr__(name: str):
    """The writer's names on first use: it needs torch, which reading or verifying a checkpoint does not."""
    if name in _WRITER:
        from sllm_faas.runtime.checkpoint import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PARTITION_SIZE", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "CheckpointError", "Manifest",
    "PartitionEntry", "TensorEntry", "convert", "read_manifest", "save_state_dict", "verify", "write_checkpoint",
]
