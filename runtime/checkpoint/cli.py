"""`sllm-faas convert | inspect | verify`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from sllm_faas.common.settings import argument_type
from sllm_faas.common.units import parse_size
from sllm_faas.runtime.checkpoint.format import CheckpointError, read_manifest


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "convert":
        from sllm_faas.runtime.checkpoint.writer import DEFAULT_PARTITION_SIZE

        parser.add_argument("src", help="a .safetensors file, an HF model folder (safetensors, sharded or not), or a "
                                        ".gguf file (dequantised; default dtype bfloat16)")
        parser.add_argument("dst", help="the checkpoint directory to create")
        parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                            help="cast floating-point tensors (default: keep each tensor's dtype)")
        parser.add_argument("--partition-size", type=argument_type(parse_size), default=DEFAULT_PARTITION_SIZE,
                            help="target bytes per partition file, e.g. 512MiB (default: 1GiB)")
        parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    else:
        parser.add_argument("dir", help="a converted checkpoint directory")
        if verb == "inspect":
            parser.add_argument("--tensors", action="store_true", help="list every tensor")


def run(args: argparse.Namespace) -> int:
    try:
        if args.verb == "convert":
            from sllm_faas.runtime.checkpoint.dtypes import DTYPES
            from sllm_faas.runtime.checkpoint.writer import convert

            if args.src.endswith(".gguf"):
                from sllm_faas.runtime.checkpoint.gguf import convert_gguf as convert
            manifest = convert(args.src, args.dst, dtype=DTYPES[args.dtype] if args.dtype else None,
                               partition_size=args.partition_size, progress=not args.no_progress,
                               overwrite=args.overwrite)
            print(f"wrote {args.dst}: {len(manifest.tensors)} tensors, {len(manifest.partitions)} partition(s), "
                  f"{human(manifest.total_bytes)}")
        elif args.verb == "inspect":
            print_summary(args.dir, args.tensors)
        else:
            from sllm_faas.runtime.checkpoint.verify import verify

            manifest = verify(args.dir)
            print(f"ok: {len(manifest.partitions)} partition(s), {human(manifest.total_bytes)} verified")
    except CheckpointError as exc:
        print(f"sllm-faas {args.verb}: {exc}", file=sys.stderr)
        return 1
    return 0


def print_summary(directory: str, list_tensors: bool) -> None:
    from sllm_faas.runtime.model.families import decoder_path

    manifest = read_manifest(directory)
    payload = sum(t.nbytes for t in manifest.tensors.values())
    dtypes = Counter(t.dtype for t in manifest.tensors.values())
    print(f"checkpoint  {directory}")
    print(f"format      sllm-checkpoint v{manifest.version}, alignment {manifest.alignment} B")
    print(f"source      {manifest.source.get('kind', '?')} {manifest.source.get('path', '')}".rstrip())
    print(f"tensors     {len(manifest.tensors)} ({human(payload)} of data), aliases {len(manifest.aliases)}")
    print("dtypes      " + ", ".join(f"{name} x{count}" for name, count in dtypes.most_common()))
    print(f"partitions  {len(manifest.partitions)} ({human(manifest.total_bytes)} on disk)")
    print(f"decoder     {decoder_path(directory)}")
    per_partition = Counter(t.partition for t in manifest.tensors.values())
    for index, part in enumerate(manifest.partitions):
        count = per_partition[index]
        print(f"  {part.file}  {human(part.size):>10}  {count:5d} tensors  sha256 {part.sha256[:16]}…")
    for alias, target in manifest.aliases.items():
        print(f"alias       {alias} -> {target}")
    if list_tensors:
        width = max((len(name) for name in manifest.tensors), default=0)
        for name, t in manifest.tensors.items():
            print(f"  {name:{width}}  {t.dtype:>9}  {str(list(t.shape)):>18}  p{t.partition}@{t.offset}")
