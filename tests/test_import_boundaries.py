"""Processes that do not run a model import no torch (or transformers) when they start.

The runtime's app must answer /_/health while torch is still importing for the cold start, and the control
plane (controller, gateway, anything reading a manifest) should not pay torch's ~1 s and ~200 MB at all.
Each module is imported in a fresh interpreter, the way its server process starts it; and the services are
started as `sllm-faas up` starts them, used, and their processes' memory maps checked for torch.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

TORCH_FREE = [
    "sllm_faas.runtime.server.app",  # the runtime's WSGI app: torch comes with the model, in the cold-start thread
    "sllm_faas.runtime.server.openai_api",  # request parsing and SamplingParams (runtime/model/params.py)
    "sllm_faas.controller.service",  # the placement controller's workers
    "sllm_faas.runtime.local.gateway",  # the local gateway
    "sllm_faas.runtime.checkpoint",  # reading and verifying checkpoints; the writer loads lazily
    "sllm_faas.runtime.checkpoint.format",  # the spec: dtype names and sizes, no torch dtypes
    "sllm_faas.runtime.cli",  # every `sllm-faas` verb's start
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_control_plane_module_imports_no_torch(module):
    probe = (f"import sys, json, {module}; "
             "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert loaded == [], f"importing {module} imports {loaded}"


# -- the import graph: one namespace, plumbing at the bottom, no cycles ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sllm_faas"


def _modules() -> dict[str, Path]:
    """Every module of the sllm_faas package (its runtime/, controller/ and redis_schema/ are links to the top-level
    folders), by dotted name."""
    found = {}
    paths = [Path(d, f) for d, _, files in os.walk(PACKAGE, followlinks=True) for f in files if f.endswith(".py")]
    for path in paths:
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(part.startswith("_") and part not in ("__init__", "__main__") for part in parts):
            continue  # runtime/_templates, runtime/_examples: shipped data
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module of ours, at module level?) for each import in one module; TYPE_CHECKING blocks count as
    imports (a cycle hidden behind them is still a cycle of the design)."""
    found = []

    def resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in resolve(child):
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        found.append((target, top))
            walk(child, top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(ast.parse(path.read_text()), True)
    return found


def test_sources_import_only_through_the_sllm_faas_namespace():
    bare = []
    for path in [*ROOT.glob("runtime/**/*.py"), *ROOT.glob("controller/**/*.py"), *ROOT.glob("redis_schema/*.py"),
                 *PACKAGE.glob("common/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("examples/**/*.py"), *ROOT.glob("templates/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{path.relative_to(ROOT)}: {n}" for n in names
                     if n.split(".")[0] in ("runtime", "controller", "redis_schema")]
    assert bare == []


def test_common_plumbing_depends_on_nothing_else_of_ours():
    modules = _modules()
    outside = {f"{name} -> {target}" for name, path in modules.items() if name.startswith("sllm_faas.common")
               for target, _ in _imports(name, path, modules)
               if not target.startswith("sllm_faas.common") and target != "sllm_faas"}
    assert outside == set()


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: {target for target, _ in _imports(name, path, modules)} for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


# -- the running services: started as `sllm-faas up` starts them, used, then their processes inspected --------------

def _maps_torch(pid: int) -> list[str]:
    """The torch shared objects mapped into process `pid` (libtorch*, torch/_C*): an imported torch."""
    with open(f"/proc/{pid}/maps") as handle:
        paths = {line.split(None, 5)[5].strip() for line in handle if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if "libtorch" in p or "/torch/_C" in p)


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace")


def test_running_control_plane_maps_no_torch_after_serving(smollm2, redis_target, tmp_path):
    """`sllm-faas up` (real gunicorn masters and workers), then a function invoked from zero through all of it:
    the gateway proxies (an instance's own error passes through as the instance wrote it, under the caller's
    request id), the controller places, the node loader stages the model into DRAM and leases it. The
    runtime instance loads torch (its own process, a child of the gateway's worker); the services' masters and
    workers must not have mapped it."""
    from test_local_cluster import Up, write_stack

    from sllm_faas.common.processes import children_by_parent

    store = tmp_path / "store"
    store.mkdir()
    (store / "smollm2-a").symlink_to(smollm2["sllm"])
    up = Up(tmp_path, store, redis_target.url, f"sllm-test-torch:{os.getpid()}:", nodes=1, slots=1,
            extra=["--pool-size", "0"])
    try:
        deployed = up.deploy(write_stack(tmp_path / "stack.yml", {"fa": {"model": "smollm2-a"}}))
        assert deployed.returncode == 0, deployed.stderr
        answer = requests.post(f"{up.gateway}/function/fa", json={"question": "What is the capital of France?"},
                               timeout=300)
        assert answer.status_code == 200 and answer.headers["X-Sllm-Node"] == "node-0", answer.text
        assert json.loads(answer.headers["X-Sllm-Cold-Start"])["tier"] == "dram"   # staged by the loader
        wrong = requests.post(f"{up.gateway}/function/fa/v1/chat/completions", json={"messages": []},
                              headers={"X-Request-Id": "trace-up-1"}, timeout=60)
        assert wrong.status_code == 400 and wrong.headers["X-Request-Id"] == "trace-up-1"   # one id, end to end
        assert wrong.json()["error"]["param"] == "messages", wrong.text   # the instance's own error, as it wrote it
        parents = children_by_parent()
        services = {_command(pid): pid for pid in parents.get(up.process.pid, set())}
        found = {}
        for command, master in services.items():
            kind = next((k for k in ("controller", "loader", "gateway") if k in command), None)
            if kind:
                found[kind] = {master, *parents.get(master, set())}   # the master and its gunicorn workers
        assert set(found) == {"controller", "loader", "gateway"}, services
        assert all(len(pids) >= 2 for pids in found.values()), found   # a worker beside each master
        torch_mapped = {kind: {pid: _maps_torch(pid) for pid in pids if _maps_torch(pid)}
                        for kind, pids in found.items()}
        assert torch_mapped == {"controller": {}, "loader": {}, "gateway": {}}
        runtimes = [pid for worker in found["gateway"] for pid in parents.get(worker, set())]
        assert any(_maps_torch(pid) or any(_maps_torch(c) for c in parents.get(pid, set())) for pid in runtimes), \
            "the check sees no torch even in the runtime instance that loaded the model"
    finally:
        assert up.stop() == 0
