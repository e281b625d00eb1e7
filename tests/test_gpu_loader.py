"""GPU paths: the pinned-ring pipeline and CUDA IPC import. Run only where CUDA is usable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sllm_faas.runtime.checkpoint import read_manifest, save_state_dict
from sllm_faas.runtime.loader import load

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_ring_pipeline_matches_cpu(tmp_path, chunk):
    from sllm_faas.runtime.loader.gpu import load_to_gpu

    state = {f"w{i}": torch.randn(100_000 + i).to(torch.bfloat16) for i in range(12)}
    state["tied"] = state["w0"]
    save_state_dict(state, tmp_path / "ck", partition_size=256 << 10)
    manifest = read_manifest(tmp_path / "ck")
    buffers = load_to_gpu(tmp_path / "ck", manifest, "cuda", chunk=chunk, slots=3)
    assert all(b.is_cuda for b in buffers)
    loaded = load(tmp_path / "ck", device="cuda")
    for name, tensor in state.items():
        assert loaded[name].is_cuda and torch.equal(loaded[name].cpu(), tensor), name


def test_cuda_ipc_import_from_another_process(tmp_path):
    from sllm_faas.runtime.loader.gpu import export_ipc, load_to_gpu

    state = {"a": torch.randn(1000), "b": torch.arange(77, dtype=torch.int64)}
    save_state_dict(state, tmp_path / "ck")
    manifest = read_manifest(tmp_path / "ck")
    buffers = load_to_gpu(tmp_path / "ck", manifest, "cuda")
    description = json.dumps(export_ipc(buffers))
    code = f"""
import json, sys, torch
from sllm_faas.runtime.checkpoint import read_manifest
from sllm_faas.runtime.loader.gpu import import_ipc
from sllm_faas.runtime.loader.views import tensor_views
manifest = read_manifest({str(tmp_path / 'ck')!r})
tensors = tensor_views(manifest, import_ipc(json.loads(sys.stdin.read()), manifest))
print(json.dumps({{k: v.double().sum().item() for k, v in tensors.items()}}))
"""
    result = subprocess.run([sys.executable, "-c", code], input=description, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    sums = json.loads(result.stdout)
    for name, tensor in state.items():
        assert sums[name] == pytest.approx(tensor.double().sum().item())
