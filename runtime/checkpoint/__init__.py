"""The sllm checkpoint format: spec in docs/FORMAT.md.

    from runtime.checkpoint import convert, save_state_dict, read_manifest, verify
    from runtime.loader import load          # tensors, as views into one buffer per partition
"""

from runtime.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    PartitionEntry,
    TensorEntry,
    read_manifest,
)
from runtime.checkpoint.verify import verify
from runtime.checkpoint.writer import DEFAULT_PARTITION_SIZE, convert, save_state_dict, write_checkpoint

__all__ = [
    "DEFAULT_PARTITION_SIZE", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "CheckpointError", "Manifest",
    "PartitionEntry", "TensorEntry", "convert", "read_manifest", "save_state_dict", "verify", "write_checkpoint",
]
