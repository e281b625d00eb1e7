"""Contracts with the platforms we cannot run here, each rule reproduced from the upstream source it cites:

- faas-netes CE's deploy validation (openfaas/faas-netes pkg/handlers/validate.go, its table in
  validate_test.go, MaxReplicas in pkg/handlers/replica_reader.go): which stack file deploys on CE.
- of-watchdog's readiness (openfaas/of-watchdog pkg/readiness.go, config/config.go `ready_path`, pkg/watchdog.go
  lock file) and faas-netes CE's probes (pkg/k8s/probes.go: /_/health or `cat /tmp/.lock`).
- faas-cli's template pull (openfaas/faas-cli commands/fetch_templates.go, builder/copy.go, versioncontrol/git.go)
  and build context (go-sdk builder/builder.go CreateBuildContext; builder/build.go ensureHandlerPath): paths are
  relative to the working directory.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2"
TEMPLATE = ROOT / "templates" / "sllm-python"
STACKS = {"ce": EXAMPLE / "stack.yml", "pro": EXAMPLE / "stack-pro.yml"}

# -- faas-netes CE: pkg/handlers/validate.go ---------------------------------------------------------------------

CE_MAX_REPLICAS = 5  # faas-netes pkg/handlers/replica_reader.go: const MaxReplicas = 5
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # validate.go validDNS


def go_atoi(text: str) -> int | None:
    """strconv.Atoi: optional sign and decimal digits, nothing else (None where Go returns an error)."""
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else None


def ce_validate_scaling_labels(labels: dict[str, str] | None) -> str | None:
    """validate.go validateScalingLabels, in its order; the first error, as faas-netes words it."""
    if labels is None:
        return None
    if labels.get("com.openfaas.scale.zero") == "true":
        return "com.openfaas.scale.zero not available for Community Edition"
    for name in ("zero-duration", "target", "type"):
        if f"com.openfaas.scale.{name}" in labels:
            return f"com.openfaas.scale.{name} not available for Community Edition"
    for name in ("max", "min"):
        value = go_atoi(labels.get(f"com.openfaas.scale.{name}", ""))
        if value is not None and value > CE_MAX_REPLICAS:
            return f"com.openfaas.scale.{name} is set too high for Community Edition"
    return None


def ce_validate_deploy_request(request: dict) -> str | None:
    """validate.go ValidateDeployRequest (called by the deploy and update handlers)."""
    if not request.get("service"):
        return "service: is required"
    if not DNS_LABEL.match(request["service"]):
        return f"service: ({request['service']}) is invalid, must be a valid DNS entry"
    if not request.get("image"):
        return "image: is required"
    return ce_validate_scaling_labels(request.get("labels"))


def function_deployments(stack_path: Path) -> list[tuple[dict, dict]]:
    """What `faas-cli deploy -f` POSTs per function (faas-cli commands/deploy.go: service = the function's key,
    image, envVars = environment, labels, annotations), with the raw stack entry."""
    stack = yaml.safe_load(stack_path.read_text())
    return [({"service": name, "image": body.get("image", ""), "envVars": body.get("environment") or {},
              "labels": {k: str(v) for k, v in (body.get("labels") or {}).items()},
              "annotations": {k: str(v) for k, v in (body.get("annotations") or {}).items()}}, body)
            for name, body in stack["functions"].items()]


# validate_test.go Test_validateScalingLabels, case by case
UPSTREAM_CASES = [
    ({}, None),
    ({"com.openfaas.scale.zero": "true"}, "com.openfaas.scale.zero not available for Community Edition"),
    ({"com.openfaas.scale.zero-duration": "15m"},
     "com.openfaas.scale.zero-duration not available for Community Edition"),
    ({"com.openfaas.scale.target": "10"}, "com.openfaas.scale.target not available for Community Edition"),
    ({"com.openfaas.scale.type": "cpu"}, "com.openfaas.scale.type not available for Community Edition"),
    ({"com.openfaas.scale.min": "1"}, None),
    ({"com.openfaas.scale.min": "5"}, None),
    ({"com.openfaas.scale.max": "5"}, None),
    ({"com.openfaas.scale.max": "6"}, "com.openfaas.scale.max is set too high for Community Edition"),
    ({"com.openfaas.scale.min": "6"}, "com.openfaas.scale.min is set too high for Community Edition"),
]


@pytest.mark.parametrize("labels, error", UPSTREAM_CASES, ids=[str(c[0]) for c in UPSTREAM_CASES])
def test_ce_label_rules_match_faas_netes_own_table(labels, error):
    assert ce_validate_scaling_labels(labels) == error


def test_ce_stack_deploys_on_community_edition_and_pro_stack_needs_pro():
    for request, _ in function_deployments(STACKS["ce"]):
        assert ce_validate_deploy_request(request) is None, f"{STACKS['ce']}: functions.{request['service']}"
        assert "com.openfaas.scale.zero" not in request["labels"]
    for request, _ in function_deployments(STACKS["pro"]):
        error = ce_validate_deploy_request(request)
        assert error == "com.openfaas.scale.zero not available for Community Edition", error
        labels = request["labels"]
        assert labels["com.openfaas.scale.zero"] == "true" and labels["com.openfaas.scale.min"] == "0"
        # the Pro readiness probe calls the watchdog's /_/ready, which the template forwards to the runtime
        assert request["annotations"]["com.openfaas.ready.http.path"] == "/_/ready"


def test_the_two_stacks_differ_only_in_what_needs_pro():
    (ce, ce_body), = function_deployments(STACKS["ce"])
    (pro, pro_body), = function_deployments(STACKS["pro"])
    pro_only_env = {"max_inflight"}  # useful only with the Pro gateway, which retries 429s
    assert {k: v for k, v in pro["envVars"].items() if k not in pro_only_env} == ce["envVars"]
    assert {k: v for k, v in pro["labels"].items() if k in ce["labels"]} == ce["labels"]
    assert not ce["annotations"]
    same = ("lang", "handler", "image", "requests", "limits")
    assert {k: ce_body.get(k) for k in same} == {k: pro_body.get(k) for k in same}


@pytest.mark.parametrize("stack", list(STACKS.values()), ids=list(STACKS))
def test_stacks_read_in_local_mode_and_carry_no_host_paths(stack):
    from sllm_faas.runtime.local.stack import read_stack

    (spec,) = read_stack(stack)
    assert spec.model == "smollm2-135m-instruct" and (spec.handler / "handler.py").is_file()
    text = yaml.safe_dump(yaml.safe_load(stack.read_text()))  # values, not comments
    assert "hostPath" not in text and "/run/sllm" not in text  # the webhook mounts the loader's paths


# -- of-watchdog readiness and faas-netes CE probes ----------------------------------------------------------------


def dockerfile_env(path: Path, stage: str = "ship") -> dict[str, str]:
    """ENV of a Dockerfile stage and the stages it builds FROM (enough for `ENV k="v" \\` lists)."""
    text = path.read_text().replace("\\\n", " ")
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", line, re.I):
            current = match[2]
            stages[current] = {"base": match[1], "env": {}}
        elif line.upper().startswith("ENV ") and current:
            stages[current]["env"].update(dict(re.findall(r'(\w+)="([^"]*)"', line) or
                                               re.findall(r"(\w+)=(\S+)", line)))
    env, name = {}, stage
    while name in stages:
        env = {**stages[name]["env"], **env}
        name = stages[name]["base"]
    return env


def watchdog_ready(env: dict[str, str], lock_present: bool, inflight: int, upstream: str) -> int:
    """of-watchdog pkg/readiness.go readiness.ServeHTTP for GET /_/ready: 503 without the lock file (written by
    pkg/watchdog.go as soon as it listens), 429 when max_inflight is met, else, with `ready_path` set
    (config/config.go ReadyEndpoint), the function handler's answer for that path (http mode: the upstream's);
    else 200."""
    if not lock_present:
        return 503
    limit = int(env.get("max_inflight", "0") or 0)
    if limit > 0 and inflight >= limit:
        return 429
    if env.get("ready_path"):
        try:
            with urllib.request.urlopen(upstream + env["ready_path"], timeout=5) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
    return 200


def faas_netes_ce_probe(http_probe: bool = True) -> dict:
    """faas-netes pkg/k8s/probes.go MakeProbes: readiness and liveness alike, no annotation changes them on CE."""
    return {"httpGet": {"path": "/_/health", "port": 8080}} if http_probe else \
        {"exec": {"command": ["cat", "/tmp/.lock"]}}


@pytest.fixture
def runtime_like_upstream():
    """A real HTTP server answering /_/ready like the runtime: 503 while loading, 200 once `loaded` is set."""
    loaded = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status = 200 if self.path == "/_/ready" and loaded.is_set() else 503 if self.path == "/_/ready" else 404
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", loaded
    server.shutdown()
    server.server_close()


def test_template_watchdog_ready_follows_the_model_not_the_lock_file(runtime_like_upstream):
    url, loaded = runtime_like_upstream
    env = dockerfile_env(TEMPLATE / "Dockerfile")
    assert env["mode"] == "http" and env["upstream_url"] == "http://127.0.0.1:5000"
    assert env["ready_path"] == "/_/ready"
    assert watchdog_ready(env, lock_present=True, inflight=0, upstream=url) == 503  # model still loading
    loaded.set()
    assert watchdog_ready(env, lock_present=True, inflight=0, upstream=url) == 200
    assert watchdog_ready(env, lock_present=False, inflight=0, upstream=url) == 503
    # the Pro stack's max_inflight makes a saturated pod unready (429) before the runtime is asked
    pro_env = {**env, **function_deployments(STACKS["pro"])[0][0]["envVars"]}
    assert watchdog_ready(pro_env, lock_present=True, inflight=16, upstream=url) == 429
    # without ready_path the watchdog is ready as soon as it listens: the bug this template avoids
    loaded.clear()
    assert watchdog_ready({k: v for k, v in env.items() if k != "ready_path"}, True, 0, url) == 200


def test_ce_probes_do_not_see_the_model():
    """On CE the kubelet probes /_/health (or the lock file), which of-watchdog answers from its lock file alone;
    only the Pro annotation or the sllm-faas webhook put /_/ready on the pod (deploy/README.md says so)."""
    for probe in (faas_netes_ce_probe(True), faas_netes_ce_probe(False)):
        assert (probe.get("httpGet") or {}).get("path") != "/_/ready"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "pkg/k8s/probes.go" in readme and "com.openfaas.ready.http.path" in readme


# -- faas-cli template pull and build -------------------------------------------------------------------------------

TEMPLATE_DIRECTORY = "./template/"  # fetch_templates.go TemplateDirectory


def faas_cli_copy(src: Path, dest: Path) -> None:
    """builder/copy.go CopyFiles: os.Stat (follows symlinks), MkdirAll, then file by file."""
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.listdir(src)):
            faas_cli_copy(src / entry, dest / entry)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def faas_cli_template_pull(repo_url: str, cwd: Path, scratch: Path) -> list[str]:
    """fetch_templates.go fetchTemplates + moveTemplates: shallow `git clone` (versioncontrol/git.go
    GitCloneDefault), then every directory entry of <clone>/template/ is copied to <cwd>/template/<lang>."""
    clone = scratch / "openfaas-templates"
    subprocess.run(["git", "clone", repo_url, str(clone), "--depth=1", "--config", "core.autocrlf=false"],
                   check=True, capture_output=True)
    extracted = clone / TEMPLATE_DIRECTORY
    fetched = []
    for entry in sorted(os.scandir(extracted), key=lambda e: e.name):  # os.ReadDir follows the final symlink
        if not entry.is_dir():  # DirEntry.IsDir: the entry's own type
            continue
        faas_cli_copy(extracted / entry.name, cwd / TEMPLATE_DIRECTORY / entry.name)
        fetched.append(entry.name)
    return fetched


def faas_cli_build_context(name: str, handler: str, lang: str, cwd: Path) -> Path:
    """go-sdk builder.CreateBuildContext: ./build/<name> = ./template/<lang> with the handler's entries (except
    build and template) copied over ./build/<name>/function; handler and template are relative to the cwd
    (builder/build.go ensureHandlerPath: os.Stat(handler))."""
    handler_dir = cwd / handler
    assert handler_dir.is_dir(), f"building {name}, {handler} is an invalid path (relative to {cwd})"
    context = cwd / "build" / name
    shutil.rmtree(context, ignore_errors=True)
    faas_cli_copy(cwd / "template" / lang, context)
    for entry in sorted(os.listdir(handler_dir)):
        if entry not in ("build", "template"):
            faas_cli_copy(handler_dir / entry, context / "function" / entry)
    return context


def committed_copy_of_the_template_layout(tmp_path: Path) -> str:
    """A git repository holding what this one commits for `faas-cli template pull`: the `template` symlink and
    templates/ (so the test sees the working tree, committed or not)."""
    repo = tmp_path / "origin"
    repo.mkdir()
    link = ROOT / "template"
    assert link.is_symlink(), "template must be a symlink to templates (one source for faas-cli and the design)"
    os.symlink(os.readlink(link), repo / "template")
    shutil.copytree(ROOT / "templates", repo / "templates")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "templates"], check=True)
    tree = subprocess.run([*git, "ls-files", "-s", "template"], check=True, capture_output=True, text=True).stdout
    assert tree.startswith("120000 "), tree  # committed as a symlink, as in this repository
    return repo.as_uri()


def test_template_pull_finds_the_template_through_the_symlink(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    fetched = faas_cli_template_pull(committed_copy_of_the_template_layout(tmp_path), project, tmp_path)
    assert fetched == ["sllm-python"]
    pulled = project / "template" / "sllm-python"
    assert not pulled.is_symlink() and (pulled / "template.yml").is_file()
    assert yaml.safe_load((pulled / "template.yml").read_text())["language"] == "sllm-python"
    assert sorted(p.relative_to(pulled) for p in pulled.rglob("*")) == \
        sorted(p.relative_to(TEMPLATE) for p in TEMPLATE.rglob("*") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("stack", list(STACKS.values()), ids=list(STACKS))
def test_faas_cli_builds_the_example_from_its_folder(tmp_path, stack):
    """`cd examples/smollm2 && faas-cli template pull ... && faas-cli build -f stack.yml`: the handler resolves
    from the working directory, and every file the Dockerfile COPYs is in the build context."""
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    faas_cli_template_pull(committed_copy_of_the_template_layout(tmp_path), project, tmp_path)
    for request, body in function_deployments(project / stack.name):
        context = faas_cli_build_context(request["service"], body["handler"], body["lang"], project)
        assert (context / "function" / "handler.py").read_bytes() == (EXAMPLE / "function" / "handler.py").read_bytes()
        assert (context / "function" / "__init__.py").is_file()  # the template's, kept by the overlay
        dockerfile = (context / "Dockerfile").read_text()
        sources = re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(\S+)\s+\S+$", dockerfile, re.M)
        assert sources, "no COPY in the template's Dockerfile"
        for source in sources:
            assert (context / source).exists(), f"{context / 'Dockerfile'}: COPY {source}: not in the build context"
    with pytest.raises(AssertionError, match="invalid path"):  # from another folder the handler is not found
        faas_cli_build_context("smollm2", "./function", "sllm-python", tmp_path)
