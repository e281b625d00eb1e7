"""Hostile checkpoints (issue #13): every one is a CheckpointError naming the file and the problem, through the
CLI (`sllm-faas inspect | verify`, exit 1, one line) and the Python API, and nothing hangs on a FIFO or
/dev/zero. The CLI runs as a subprocess with a timeout, so a reader that blocks fails the test instead of
hanging it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sllm_faas.runtime.checkpoint import CheckpointError, read_manifest, save_state_dict, verify
from sllm_faas.runtime.loader import load

ROOT = Path(__file__).resolve().parent.parent
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    save_state_dict({"a": torch.randn(64, 64), "b": torch.arange(100, dtype=torch.int32)}, path)
    return path


def edit_manifest(path: Path, edit) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    edit(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def with_empty_extra_file(path: Path) -> Path:
    """Declare an empty extra file (size 0 passes every size check), so only its type can stop a reader."""
    edit_manifest(path, lambda d: d["extra_files"].append({"file": "empty.txt", "size": 0, "sha256": EMPTY_SHA}))
    target = path / "empty.txt"
    target.write_bytes(b"")
    return target


def deep_json(path: Path) -> tuple[str, str]:
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return "manifest.json", "nested deeper"


def huge_integer(path: Path) -> tuple[str, str]:
    text = (path / "manifest.json").read_text()
    doc = json.loads(text)
    size = doc["partitions"][0]["size"]
    (path / "manifest.json").write_text(text.replace(f'"size": {size}', '"size": ' + "9" * 5000, 1))
    return "manifest.json", "invalid JSON"


def manifest_is_a_directory(path: Path) -> tuple[str, str]:
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()
    return "manifest.json", "is a directory"


def partition_is_a_directory(path: Path) -> tuple[str, str]:
    name = read_manifest(path).partitions[0].file
    (path / name).unlink()
    (path / name).mkdir()
    return name, "is a directory"


def dimension_over_int64(path: Path) -> tuple[str, str]:
    edit_manifest(path, lambda d: d["tensors"].update(
        z={"dtype": "float32", "shape": [2**70, 0], "partition": 0, "offset": 0, "nbytes": 0}))
    return "manifest.json", "2**63 - 1"


def lone_surrogate_name(path: Path) -> tuple[str, str]:
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"a": {', '"\\ud800": {', 1))
    return "manifest.json", "surrogate"


def manifest_is_a_fifo(path: Path) -> tuple[str, str]:
    (path / "manifest.json").unlink()
    os.mkfifo(path / "manifest.json")
    return "manifest.json", "is a FIFO"


def extra_file_is_a_fifo(path: Path) -> tuple[str, str]:
    target = with_empty_extra_file(path)
    target.unlink()
    os.mkfifo(target)
    return "empty.txt", "is a FIFO"


def extra_file_links_to_dev_zero(path: Path) -> tuple[str, str]:
    target = with_empty_extra_file(path)
    target.unlink()
    target.symlink_to("/dev/zero")
    return "empty.txt", "is a device"


CASES = {f.__name__: f for f in (deep_json, huge_integer, manifest_is_a_directory, partition_is_a_directory,
                                  dimension_over_int64, lone_surrogate_name, manifest_is_a_fifo,
                                  extra_file_is_a_fifo, extra_file_links_to_dev_zero)}
# FIFOs and /dev/zero would block or never end in-process before the fix; their API check runs in a child
HANGS = {"manifest_is_a_fifo", "extra_file_is_a_fifo", "extra_file_links_to_dev_zero"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllm_faas", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_checkpoint_is_a_checkpoint_error_in_inspect_and_verify(checkpoint, case):
    file, problem = CASES[case](checkpoint)
    for verb in (["inspect", "--tensors"], ["verify"]):
        result = cli(verb[0], checkpoint, *verb[1:])
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert file in result.stderr and problem in result.stderr, result.stderr


API_PROBE = """
import sys
from sllm_faas.runtime.checkpoint import CheckpointError, read_manifest, verify
from sllm_faas.runtime.loader import load
for call in (read_manifest, verify, load):
    try:
        call(sys.argv[1])
    except CheckpointError as exc:
        print(f"CheckpointError {exc}")
    except BaseException as exc:
        print(f"RAW {type(exc).__name__} {exc}")
    else:
        print("ACCEPTED")
"""


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_checkpoint_is_a_checkpoint_error_in_the_python_api(checkpoint, case):
    file, problem = CASES[case](checkpoint)
    if case in HANGS:
        result = subprocess.run([sys.executable, "-c", API_PROBE, str(checkpoint)], capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        lines = result.stdout.splitlines()
        assert len(lines) == 3 and all(line.startswith("CheckpointError") for line in lines), result
        assert all(file in line and problem in line for line in lines), lines
        return
    for call in (read_manifest, verify, load):
        with pytest.raises(CheckpointError) as info:
            call(checkpoint)
        assert file in str(info.value) and problem in str(info.value), str(info.value)

