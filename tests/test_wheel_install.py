"""A clean install from the built wheel works outside a checkout: the template and the examples ship as package data
(sllm_faas/runtime/_templates and _examples, symlinks to templates/ and examples/ in the repository), and
`sllm-faas deploy -f` of the packaged example stack builds the function from the packaged template against a
running `sllm-faas up`, all from the installed venv with a working directory outside the checkout.

Offline and fast: the wheel is built without build isolation, installed with --no-deps --no-index, and the
dependencies (torch, flask, ...) come from the test's own environment through a .pth file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import requests

from sllm_faas.runtime.embedded_redis import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent


def tracked_files(folder: str) -> set[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", folder],
                         check=True, capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if line and (ROOT / line).is_file()}


def test_wheel_installs_and_deploys_the_example_outside_a_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("sllm_faas-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "examples"):
        expected = {f"sllm_faas/runtime/_{folder}" + f[len(folder):] for f in tracked_files(folder)}
        assert expected and expected <= names, sorted(expected - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_sllm_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch & co., not reinstalled
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import sllm_faas, sllm_faas.runtime.local.build as b; "
                            "print(sllm_faas.__file__); print(b.TEMPLATES)"],
                           check=True, capture_output=True, text=True, cwd=work).stdout.split()
    assert where[0].startswith(str(site)), f"sllm_faas imported from {where[0]}, not from the installed wheel"
    templates = Path(where[1])
    generic = [name for name in ("runtime", "controller", "redis_schema", "common") if (site / name).exists()]
    assert generic == [], f"the wheel puts generic top-level packages in site-packages: {generic}"
    assert templates.is_dir() and not templates.is_symlink() and str(templates).startswith(str(site))
    stack = site / "sllm_faas" / "runtime" / "_examples" / "smollm2" / "stack.yml"

    cli = venv / "bin" / "sllm-faas"
    state = tmp_path / "cluster.json"
    log = open(tmp_path / "up.log", "ab")  # noqa: SIM115 - closed below
    up = subprocess.Popen([str(cli), "up", "--nodes", "1", "--slots", "1", "--port", str(free_tcp_port()),
                           "--model-store", str(tmp_path / "store"), "--workdir", str(tmp_path / "up"),
                           "--key-prefix", "wheeltest:", "--state-file", str(state), "--dram-budget", "256MiB"],
                          stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "sllm-faas up did not come up"
            time.sleep(0.1)
        gateway = json.loads(state.read_text())["gateway"]
        deployed = subprocess.run([str(cli), "deploy", "-f", str(stack), "-g", gateway], cwd=work,
                                  capture_output=True, text=True, timeout=60)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        build = work / "build" / "smollm2"  # ./build, as faas-cli
        for name in ("Dockerfile", "template.yml", "index.py", "requirements.txt"):
            assert (build / name).read_bytes() == (templates / "sllm-python" / name).read_bytes(), name
        assert (build / "function" / "handler.py").read_bytes() == \
            (site / "sllm_faas" / "runtime" / "_examples" / "smollm2" / "function" / "handler.py").read_bytes()
        admin = {"Authorization": "Bearer " + Path(json.loads(state.read_text())["token_file"]).read_text()}
        function = requests.get(f"{gateway}/system/function/smollm2", headers=admin, timeout=10).json()
        assert function["annotations"]["sllm.io/build"] == str(build.resolve())
        assert function["annotations"]["sllm.io/model"] == "smollm2-135m-instruct"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        log.close()
