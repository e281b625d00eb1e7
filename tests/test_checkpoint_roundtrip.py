"""Every dtype and odd shape survives save -> load bit for bit, with every loading strategy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sllm_faas.runtime.checkpoint import convert, read_manifest, save_state_dict, verify
from sllm_faas.runtime.checkpoint.format import BLOCK_SIZE, TENSOR_ALIGNMENT
from sllm_faas.runtime.loader import load

STRATEGIES = ["mmap", "direct", "direct-4k", "buffered", "auto"]


def sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash(str(dtype)) % 2**31)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**30)), min(info.max, 2**30)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
          torch.int64, torch.bool, torch.float64]
DTYPES += [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_roundtrips(tmp_path, dtype, strategy):
    state = {"matrix": sample(dtype), "vector": sample(dtype, (13,)), "scalar": sample(dtype, ()),
             "empty": sample(dtype, (0, 4))}
    save_state_dict(state, tmp_path / "ck")
    assert_same(load(tmp_path / "ck", strategy=strategy), state)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tied_noncontiguous_multipartition(tmp_path, strategy):
    embed = torch.randn(300, 64)
    state = {
        "embed": embed, "lm_head": embed,                      # tied: stored once
        "transposed": torch.randn(64, 48).t(),                 # non-contiguous source
        "sliced": torch.arange(1000, dtype=torch.int32)[::3],  # strided view of a bigger storage
        "big": torch.randn(5000), "small": torch.ones(3, dtype=torch.int16),
    }
    manifest = save_state_dict(state, tmp_path / "ck", partition_size=16 << 10)
    assert len(manifest.partitions) >= 3
    assert manifest.aliases == {"lm_head": "embed"}
    assert "lm_head" not in manifest.tensors
    loaded = load(tmp_path / "ck", strategy=strategy)
    assert_same(loaded, state)
    assert loaded["lm_head"] is loaded["embed"]


def test_layout_is_aligned_and_padded(tmp_path):
    state = {f"t{i}": torch.randn(i * 7 + 1) for i in range(20)}
    manifest = save_state_dict(state, tmp_path / "ck", partition_size=8 << 10)
    for entry in manifest.tensors.values():
        assert entry.offset % TENSOR_ALIGNMENT == 0
    for part in manifest.partitions:
        assert part.size % BLOCK_SIZE == 0
        assert (tmp_path / "ck" / part.file).stat().st_size == part.size


def test_tensors_are_views_into_one_buffer_per_partition(tmp_path):
    state = {"a": torch.randn(10), "b": torch.randn(20), "c": torch.randn(30)}
    save_state_dict(state, tmp_path / "ck")
    loaded = load(tmp_path / "ck", strategy="direct")
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 1


def test_dtype_cast_touches_floats_only(tmp_path):
    state = {"w": torch.randn(4, 4), "ids": torch.arange(6), "mask": torch.tensor([True, False])}
    save_file(state, tmp_path / "m.safetensors")
    convert(tmp_path / "m.safetensors", tmp_path / "ck", dtype=torch.bfloat16)
    loaded = load(tmp_path / "ck")
    assert loaded["w"].dtype == torch.bfloat16 and torch.equal(loaded["w"], state["w"].bfloat16())
    assert torch.equal(loaded["ids"], state["ids"]) and torch.equal(loaded["mask"], state["mask"])


def test_sharded_hf_folder_with_aux_files(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text("{}")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    manifest = convert(tmp_path / "sharded", tmp_path / "ck")
    assert manifest.source["kind"] == "hf-folder" and len(manifest.source["files"]) > 1
    for aux in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "ck" / aux).read_bytes() == (tmp_path / "sharded" / aux).read_bytes()
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_same(load(tmp_path / "ck"), expected)


def test_partition_checksums_match_sha256sum(tmp_path):
    save_state_dict({"x": torch.randn(1000)}, tmp_path / "ck")
    manifest = verify(tmp_path / "ck")
    part = manifest.partitions[0]
    out = subprocess.run(["sha256sum", part.file], cwd=tmp_path / "ck", capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == part.sha256


def test_manifest_is_plain_json_with_source(tmp_path, tiny_llama_dir):
    convert(tiny_llama_dir, tmp_path / "ck")
    doc = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert doc["format"] == "sllm-checkpoint" and doc["version"] == 1
    assert doc["source"]["path"] == str(tiny_llama_dir.resolve())
    assert read_manifest(tmp_path / "ck").source["kind"] == "hf-folder"


def test_second_process_maps_the_same_pages(tmp_path):
    """A DRAM-tier load adds (almost) no anonymous memory: the pages belong to the page cache."""
    state = {"w": torch.randn(16 << 20 >> 2)}  # 16 MiB
    save_state_dict(state, tmp_path / "ck")
    code = f"""
import torch
from sllm_faas.runtime.loader import load
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
before = anon()
tensors = load({str(tmp_path / 'ck')!r}, strategy='mmap')
float(tensors['w'].sum())
print(anon() - before)
"""
    subprocess.run(["cat", str(next((tmp_path / "ck").glob("part-*")))], stdout=subprocess.DEVNULL, check=True)
    added = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert added < 0.05 * (16 << 20), added
