"""The `sllm-faas` entry point and the monitoring files shipped with it (deploy/monitoring, deploy/grafana)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_installed_package_version():
    result = subprocess.run([sys.executable, "-m", "sllm_faas", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f"sllm-faas {version('sllm-faas')}"


def test_dashboard_queries_name_declared_metrics_and_render_py_evaluates_each():
    spec = importlib.util.spec_from_file_location("render", ROOT / "deploy" / "grafana" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    code = "".join(p.read_text() for p in [*ROOT.glob("runtime/**/*.py"), *ROOT.glob("controller/**/*.py"),
                                           *ROOT.glob("sllm_faas/common/*.py")])
    panels = json.loads((ROOT / "deploy" / "grafana" / "sllm-faas.json").read_text())["panels"]
    assert (ROOT / "deploy" / "grafana" / "sllm-faas.png").is_file()
    for panel in panels:
        for target in panel["targets"]:
            match = render.QUANTILE.fullmatch(target["expr"]) or render.SUM.fullmatch(target["expr"])
            assert match, target["expr"]
            metric = match[3] if match.re is render.QUANTILE else match[2]
            assert f'"{metric}"' in code or metric == "sllm_cold_start_seconds", metric
            for phase in re.findall(r'phase="(\w+)"', target["expr"]):
                assert f"`{phase}`" in (ROOT / "README.md").read_text(), phase


def test_podmonitors_select_the_pods_and_ports_the_manifests_declare():
    monitors = list(yaml.safe_load_all((ROOT / "deploy" / "monitoring" / "podmonitor.yaml").read_text()))
    manifests = [*yaml.safe_load_all((ROOT / "deploy" / "controller.yaml").read_text()),
                 *yaml.safe_load_all((ROOT / "examples" / "smollm2" / "loader-daemonset.yaml").read_text()),
                 *yaml.safe_load_all((ROOT / "examples" / "smollm2" / "knative-service.yaml").read_text())]
    templates = [m["spec"]["template"] for m in manifests if m and m["kind"] in ("Deployment", "DaemonSet", "Service")
                 and "template" in m.get("spec", {})]
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (pod,) = [t for t in templates if wanted.items() <= t["metadata"].get("labels", {}).items()]
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports, monitor["metadata"]["name"]
