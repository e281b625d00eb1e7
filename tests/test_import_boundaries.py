"""Processes that do not run a model import no torch (or transformers) when they start.

The runtime's app must answer /_/health while torch is still importing for the cold start, and the control
plane (controller, gateway, anything reading a manifest) should not pay torch's ~1 s and ~200 MB at all.
Each module is imported in a fresh interpreter, the way its server process starts it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TORCH_FREE = [
    "runtime.server.app",          # the runtime's WSGI app: torch comes with the model, in the cold-start thread
    "runtime.server.openai_api",   # request parsing and SamplingParams (runtime/model/params.py)
    "controller.service",          # the placement controller's workers
    "runtime.local.gateway",       # the local gateway
    "runtime.checkpoint",          # reading and verifying checkpoints; the writer loads lazily
    "runtime.checkpoint.format",   # the spec: dtype names and sizes, no torch dtypes
    "runtime.cli",                 # every `sllm-faas` verb's start
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_control_plane_module_imports_no_torch(module):
    probe = (f"import sys, json, {module}; "
             "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert loaded == [], f"importing {module} imports {loaded}"
