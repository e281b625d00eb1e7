"""`sllm-faas convert | inspect | verify`, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sllm_faas.common.units import parse_size
from sllm_faas.runtime.checkpoint import read_manifest


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllm_faas", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_convert_inspect_verify(tmp_path, tiny_llama_dir):
    result = cli("convert", tiny_llama_dir, tmp_path / "ck", "--dtype", "float16", "--partition-size", "64KiB")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    manifest = read_manifest(tmp_path / "ck")
    assert len(manifest.partitions) > 1
    assert {t.dtype for t in manifest.tensors.values()} == {"float16"}

    summary = cli("inspect", tmp_path / "ck", "--tensors")
    assert summary.returncode == 0
    assert "partitions" in summary.stdout and "float16" in summary.stdout
    assert "model.embed_tokens.weight" in summary.stdout and "part-00000.bin" in summary.stdout

    assert cli("verify", tmp_path / "ck").returncode == 0
    bad = tmp_path / "ck" / manifest.partitions[-1].file
    data = bytearray(bad.read_bytes())
    data[0] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = cli("verify", tmp_path / "ck")
    assert result.returncode == 1
    assert manifest.partitions[-1].file in result.stderr and "checksum mismatch" in result.stderr


def test_convert_errors_are_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    result = cli("convert", tmp_path / "bad.safetensors", tmp_path / "ck", "--no-progress")
    assert result.returncode == 1
    assert "not a readable safetensors file" in result.stderr and "Traceback" not in result.stderr
    result = cli("convert", tmp_path / "nope", tmp_path / "ck2")
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = cli("inspect", tmp_path)
    assert result.returncode == 1 and "not an sllm checkpoint" in result.stderr


def test_parse_size():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
