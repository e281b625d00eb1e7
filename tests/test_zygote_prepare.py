"""What a pool's zygote prepares for the members it forks later (runtime/server/zygote.py `prepare`): the
tokenizer of a model a member was assigned, kept per process and used only while its files are the same ones;
and a runtime's cold start reports its phases (loading, then warming) and whether its tokenizer was preloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_faas.runtime.model import tokenizer as tokenizer_module
from sllm_faas.runtime.model.tokenizer import Tokenizer


@pytest.fixture
def model_dir(smollm2, tmp_path):
    """A private copy of SmolLM2's checkpoint folder whose tokenizer files this test may change."""
    directory = tmp_path / "m"
    shutil.copytree(smollm2["sllm"], directory)
    return directory


@pytest.fixture
def fresh_preloaded(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_preloaded", type(tokenizer_module._preloaded)())


def test_a_preloaded_tokenizer_is_used_only_while_its_files_are_unchanged(model_dir, fresh_preloaded):
    assert not Tokenizer.load(model_dir).preloaded   # nothing preloaded: read
    assert Tokenizer.preload(model_dir) is True
    assert Tokenizer.preload(model_dir) is False   # kept already
    kept = Tokenizer.load(model_dir)
    assert kept.preloaded and kept is Tokenizer.load(model_dir)
    assert kept.encode("Hello world") == Tokenizer(model_dir).encode("Hello world")
    config = model_dir / "tokenizer_config.json"
    config.write_text(config.read_text())   # rewritten: another inode or mtime
    os.utime(config, ns=(1, 1))
    assert not Tokenizer.load(model_dir).preloaded
    template = model_dir / "other.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    Tokenizer.preload(model_dir, template)
    assert Tokenizer.load(model_dir, template).preloaded and not Tokenizer.load(model_dir).preloaded


def test_the_zygote_prepares_a_model_and_answers_errors_on_one_line(model_dir, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir(mode=0o700)
    zygote = subprocess.Popen([sys.executable, "-m", "sllm_faas.runtime.server.zygote", "--dir", str(pool),
                               "--reaper", str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, bufsize=1)
    try:
        assert zygote.stdout.readline().split()[0] == "ready"

        def ask(line: str) -> list[str]:
            zygote.stdin.write(line + "\n")
            zygote.stdin.flush()
            return zygote.stdout.readline().strip().split(maxsplit=3)

        env = {"SLLM_MODEL": "m", "SLLM_MODEL_STORE": str(tmp_path)}
        first = ask("prepare " + json.dumps(env))
        assert first[:2] == ["prepared", "new"] and Path(first[3]) == model_dir and float(first[2]) >= 0
        assert ask("prepare " + json.dumps(env))[:2] == ["prepared", "kept"]
        missing = ask("prepare " + json.dumps({**env, "SLLM_MODEL": "absent"}))
        assert missing[0] == "error" and "absent" in " ".join(missing)
        assert ask("prepare [1, 2]")[0] == "error"
        assert ask("prepare {not json")[0] == "error"
        assert ask("member bad/id") == ["error", "bad", "command"]
    finally:
        zygote.stdin.close()
        assert zygote.wait(timeout=30) == 0


def test_a_cold_start_reports_loading_then_warming(model_dir, fresh_preloaded):
    from sllm_faas.runtime.server.settings import Settings
    from sllm_faas.runtime.server.startup import start_model

    phases: list[str] = []
    settings = Settings.resolve(env={"SLLM_MODEL": str(model_dir), "SLLM_TORCH_THREADS": "1", "SLLM_MAX_SEQ": "256"})
    Tokenizer.preload(model_dir)
    import time

    loaded = start_model(settings, time.time(), on_phase=phases.append)
    try:
        assert phases == ["loading", "warming"]
        report = loaded.cold_start.as_dict()
        assert report["tokenizer"] == "preloaded" and report["warming_s"] > 0
        assert report["process_start_to_ready_s"] >= report["load_s"] + report["build_s"] + report["warming_s"]
    finally:
        loaded.engine.stop()
