"""Malformed checkpoints fail with one clear error naming the file and field, before any byte is used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sllm_faas.runtime.checkpoint import CheckpointError, read_manifest, save_state_dict, verify
from sllm_faas.runtime.loader import load


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ck"
    save_state_dict({"a": torch.randn(64, 64), "b": torch.arange(100, dtype=torch.int32)}, path)
    return path


def rewrite_manifest(path, edit) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    edit(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def expect_error(path, field_fragment: str, problem_fragment: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load(path)
    error = info.value
    assert field_fragment in error.field, str(error)
    assert problem_fragment in error.problem, str(error)
    assert str(path) in str(error)
    return error


CASES = {
    "offset past the end": (lambda d: d["tensors"]["a"].update(offset=1 << 40), "tensors.a.offset", "ends past"),
    "negative shape": (lambda d: d["tensors"]["a"].update(shape=[-64, -64]), "tensors.a.shape", ">= 0"),
    "huge shape": (lambda d: d["tensors"]["a"].update(shape=[2**40, 2**40]), "tensors.a.nbytes", "needs"),
    "unknown dtype": (lambda d: d["tensors"]["a"].update(dtype="complex512"), "tensors.a.dtype", "unknown dtype"),
    "parent dir in partition": (lambda d: d["partitions"][0].update(file="../escape.bin"), "partitions[0].file",
                                "not a plain file name"),
    "absolute partition": (lambda d: d["partitions"][0].update(file="/etc/passwd"), "partitions[0].file",
                           "not a plain file name"),
    "extra file escapes": (lambda d: d.update(extra_files=[{"file": "../x", "size": 1, "sha256": "0" * 64}]),
                           "extra_files[0].file", "not a plain file name"),
    "wrong version": (lambda d: d.update(version=99), "version", "unsupported version 99"),
    "wrong format": (lambda d: d.update(format="gguf"), "format", "expected 'sllm-checkpoint'"),
    "bool as number": (lambda d: d["tensors"]["a"].update(partition=True), "tensors.a.partition", "expected int"),
    "misaligned offset": (lambda d: d["tensors"]["a"].update(offset=2), "tensors.a.offset", "not aligned"),
    "overlap": (lambda d: d["tensors"]["b"].update(offset=d["tensors"]["a"]["offset"]), "tensors.", "overlaps"),
    "shape/nbytes mismatch": (lambda d: d["tensors"]["b"].update(nbytes=4), "tensors.b.nbytes", "needs"),
    "bad digest": (lambda d: d["partitions"][0].update(sha256="zz"), "partitions[0].sha256", "SHA-256"),
    "unaligned partition size": (lambda d: d["partitions"][0].update(size=4097), "partitions[0].size", "multiple"),
    "partition index out of range": (lambda d: d["tensors"]["a"].update(partition=7), "tensors.a.partition",
                                     "only 1 partitions"),
    "dangling alias": (lambda d: d.update(aliases={"c": "missing"}), "aliases.c", "not a stored tensor"),
    "tensors not a dict": (lambda d: d.update(tensors=[1, 2]), "tensors", "expected dict"),
    "nul in name": (lambda d: d["tensors"].update({"x\x00y": d["tensors"]["a"]}), "tensors.x", "NUL"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_malformed_manifest(checkpoint, case):
    edit, field_name, problem = CASES[case]
    rewrite_manifest(checkpoint, edit)
    expect_error(checkpoint, field_name, problem)


def test_invalid_json(checkpoint):
    (checkpoint / "manifest.json").write_text('{"format": "sllm-checkpoint", "version": 1,')
    expect_error(checkpoint, "manifest", "invalid JSON")


def test_duplicate_tensor_names(checkpoint):
    raw = (checkpoint / "manifest.json").read_text()
    entry = json.dumps(json.loads(raw)["tensors"]["a"])
    (checkpoint / "manifest.json").write_text(raw.replace('"tensors": {', f'"tensors": {{"a": {entry}, ', 1))
    expect_error(checkpoint, "a", "duplicate key")


def test_oversized_manifest_is_not_parsed(checkpoint):
    (checkpoint / "manifest.json").write_bytes(b" " * (64 << 20) + b"{}")
    expect_error(checkpoint, "manifest", "exceeds")


def test_truncated_partition(checkpoint):
    part = checkpoint / read_manifest(checkpoint).partitions[0].file
    os.truncate(part, part.stat().st_size - 4096)
    error = expect_error(checkpoint, "size", "truncated")
    assert error.path == str(part)


def test_claimed_terabyte_partition_fails_before_allocating(checkpoint):
    rewrite_manifest(checkpoint, lambda d: d["partitions"][0].update(size=1 << 40))
    expect_error(checkpoint, "size", "manifest says 1099511627776")


def test_missing_partition_and_missing_manifest(checkpoint, tmp_path):
    (checkpoint / read_manifest(checkpoint).partitions[0].file).unlink()
    expect_error(checkpoint, "file", "missing")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "manifest", "not an sllm checkpoint")


def test_verify_names_the_corrupt_partition(tmp_path):
    path = tmp_path / "ck"
    manifest = save_state_dict({"a": torch.randn(5000), "b": torch.randn(5000)}, path, partition_size=8192)
    bad = path / manifest.partitions[1].file
    with open(bad, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff\xff")
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        verify(path)
    assert info.value.path == str(bad)
    load(path)  # hot loads do not hash; verification is on request
    with pytest.raises(CheckpointError):
        load(path, verify=True)


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path):
    destination = tmp_path / "ck"
    code = f"""
import torch
from sllm_faas.runtime.checkpoint import save_state_dict
state = {{f"w{{i}}": torch.randn(4 << 20) for i in range(24)}}  # 384 MiB
print("ready", flush=True)
save_state_dict(state, {str(destination)!r}, partition_size=64 << 20)
"""
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and not partial:
        partial = [p for p in tmp_path.glob(".ck.partial-*") if any(p.glob("part-*.bin"))]
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert partial, "the writer never started writing"
    assert not destination.exists()
    with pytest.raises(CheckpointError):
        load(destination)
    assert not (partial[0] / "manifest.json").exists()
    with pytest.raises(CheckpointError):
        load(partial[0])
    # the next conversion to the same place cleans the dead writer's leftovers
    save_state_dict({"x": torch.ones(3)}, destination)
    assert not list(tmp_path.glob(".ck.partial-*"))
    assert torch.equal(load(destination)["x"], torch.ones(3))


def test_existing_destination_needs_overwrite(checkpoint):
    with pytest.raises(CheckpointError, match="already exists"):
        save_state_dict({"x": torch.ones(1)}, checkpoint)
    save_state_dict({"x": torch.ones(1)}, checkpoint, overwrite=True)
    assert list(load(checkpoint)) == ["x"]


def test_pickled_weights_are_refused(tmp_path):
    from sllm_faas.runtime.checkpoint import convert

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never loaded"):
        convert(folder, tmp_path / "ck")
