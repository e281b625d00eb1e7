"""`sllm-faas doctor`, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from sllm_faas.runtime.doctor import supports_o_direct
from sllm_faas.runtime.embedded_redis import free_tcp_port


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllm_faas", "doctor", *args],
                          capture_output=True, text=True, timeout=120)


def test_doctor_json_reports_the_machine(redis_target, tmp_path):
    result = doctor("--json", "--redis-url", redis_target.url, "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert checks["torch"]["details"]["version"] == torch.__version__
    assert checks["torch"]["details"]["cuda_available"] == torch.cuda.is_available()
    assert checks["shm"]["details"]["total"] > 0
    assert checks["o_direct"]["ok"] == supports_o_direct(str(tmp_path))[0]
    assert checks["redis"]["ok"] and checks["redis"]["details"]["version"]
    assert "nvml" in checks


def test_doctor_human_output(redis_target, tmp_path):
    result = doctor("--redis-url", redis_target.url, "--dir", str(tmp_path))
    assert result.returncode == 0
    assert f"torch {torch.__version__}" in result.stdout
    assert "answers at" in result.stdout


def test_doctor_fails_with_one_line_per_missing_requirement(tmp_path):
    dead = f"redis://127.0.0.1:{free_tcp_port()}/0"
    result = doctor("--redis-url", dead, "--dir", str(tmp_path / "missing"))
    assert result.returncode == 1
    reasons = result.stderr.strip().splitlines()
    assert len(reasons) == 2
    assert any(line.startswith("doctor: missing requirement: redis:") and dead in line for line in reasons)
    assert any("o_direct" in line and "does not exist" in line for line in reasons)


def test_doctor_require_gpu_fails_without_cuda(redis_target, tmp_path):
    result = doctor("--json", "--require-gpu", "--redis-url", redis_target.url, "--dir", str(tmp_path))
    assert (result.returncode == 0) == torch.cuda.is_available()
