"""The faas-cli-like verbs against one real `sllm-faas up` (embedded Redis, one node), run as subprocesses, in
file order: deploy with -e/-l/--annotation, list, describe, logs (tail, follow), remove, and the admin token."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest
import requests
from test_local_cluster import ROOT, Up, store  # noqa: F401 - store is a fixture
from test_local_hostile import stack

from sllm_faas.runtime.local.up import LocalCluster


@pytest.fixture(scope="module")
def up(store, tmp_path_factory):  # noqa: F811 - the imported fixture
    cluster = Up(tmp_path_factory.mktemp("cli"), store, None, "sllm:", nodes=1, slots=2, extra=["--pool-size", "0"])
    yield cluster
    assert cluster.stop() == 0


def cli(up: Up, *argv: str, token: bool = True, env: dict[str, str] | None = None, input: str | None = None
        ) -> subprocess.CompletedProcess:
    """`sllm-faas VERB -g GATEWAY ...`; token=False hides the file `up` wrote (another $SLLM_FAAS_CACHE)."""
    environment = {k: v for k, v in os.environ.items() if k != "SLLM_GATEWAY_TOKEN"} | (env or {})
    if not token:
        environment["SLLM_FAAS_CACHE"] = str(up.workdir.parent / "empty-cache")
    return subprocess.run([sys.executable, "-m", "sllm_faas", argv[0], "-g", up.gateway, *argv[1:]],
                          capture_output=True, text=True, timeout=300, env=environment, input=input)


def test_deploy_flags_override_the_stack_file(up):
    path = stack(up, "fc")
    deployed = cli(up, "deploy", "-f", str(path), "--build-dir", str(up.build_root), "-e", "SLLM_ACCESS_LOG=1",
                   "--label", "com.openfaas.scale.max=2", "-l", "team=llm", "--annotation", "note=from the flag")
    assert deployed.returncode == 0, deployed.stderr
    function = up.function("fc")
    assert function["envVars"]["SLLM_ACCESS_LOG"] == "1" and function["envVars"]["SLLM_MODEL"] == "smollm2-a"
    assert function["labels"] == {"com.openfaas.scale.max": "2", "team": "llm"}   # max 1 in the stack file
    assert function["annotations"]["note"] == "from the flag"
    bad = cli(up, "deploy", "-f", str(path), "--label", "novalue")
    assert bad.returncode == 2 and "-l/--label: 'novalue' is not KEY=VALUE" in bad.stderr


def test_list_quiet_verbose_and_sorted_by_invocations(up):
    assert cli(up, "deploy", "-f", str(stack(up, "fd")), "--build-dir", str(up.build_root)).returncode == 0
    answer = cli(up, "invoke", "fc", input=json.dumps({"question": "Capital of France?"}))
    assert answer.returncode == 0 and json.loads(answer.stdout)["answer"], answer.stderr
    assert cli(up, "list", "-q").stdout.split() == ["fc", "fd"]
    table = cli(up, "list").stdout.splitlines()
    assert table[0].split() == ["Function", "Invocations", "Replicas"]
    assert [row.split() for row in table[1:]] == [["fc", "1", "1"], ["fd", "0", "0"]]
    verbose = cli(up, "list", "--verbose", "--sort", "invocations").stdout.splitlines()
    assert verbose[0].split() == ["Function", "Image", "Invocations", "Replicas", "Labels"]
    assert verbose[1].split() == ["fc", "-", "1", "1", "com.openfaas.scale.max=2,", "team=llm"]


def test_describe_shows_the_function_and_its_instances_cold_start(up):
    described = cli(up, "describe", "fc")
    assert described.returncode == 0, described.stderr
    fields = dict(line.split(":", 1) for line in described.stdout.splitlines() if not line.startswith(" "))
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["Name"] == "fc" and fields["Status"] == "Ready" and fields["Replicas"] == "1"
    assert fields["Available replicas"] == "1" and fields["Invocations"] == "1" and fields["Model"] == "smollm2-a"
    assert fields["URL"] == f"{up.gateway}/function/fc" and fields["Build"] == str(up.build_root / "fc")
    assert fields["Labels"] == "com.openfaas.scale.max : 2" and "  team : llm" in described.stdout
    instance = up.function("fc")["instances"][0]
    assert f"  {instance['id']}  node node-0  pid {instance['pid']}  start spawn  ready" in described.stdout
    assert "    cold start: total " in described.stdout and " load " in described.stdout
    assert "tier " in described.stdout and "decoder native" in described.stdout
    missing = cli(up, "describe", "nosuch")
    assert missing.returncode == 1 and "nosuch: 404 function nosuch is not deployed" in missing.stderr


def test_logs_tail_and_follow(up):
    instance = up.function("fc")["instances"][0]["id"]
    everything = cli(up, "logs", "fc").stdout.splitlines()
    assert everything and all(line.startswith(instance + " ") for line in everything)
    assert any("cold start: start=spawn" in line for line in everything)
    last = cli(up, "logs", "fc", "--tail", "2").stdout.splitlines()
    assert len(last) == 2 and all(line.startswith(instance + " ") for line in last)
    follow = subprocess.Popen([sys.executable, "-m", "sllm_faas", "logs", "fc", "-g", up.gateway, "--tail", "1",
                               "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follow.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60).startswith(instance + " ")   # the tail, then what is written next
        answer = requests.post(f"{up.gateway}/function/fc/v1/completions", timeout=300,
                               json={"model": "smollm2-a", "prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200
        deadline = time.monotonic() + 60
        while "POST /v1/completions" not in (line := lines.get(timeout=60)):   # its access log line
            assert line.startswith(instance + " ") and time.monotonic() < deadline, line
    finally:
        follow.terminate()
        follow.wait(30)
    for query, status in (({"name": "fc", "tail": "x"}, 400), ({"name": "fc", "follow": "maybe"}, 400),
                          ({"name": "nosuch"}, 404)):
        response = requests.get(up.gateway + "/system/logs", params=query, headers=up.admin, timeout=10)
        assert response.status_code == status, (query, response.text)
    assert requests.get(up.gateway + "/system/logs", params={"name": "fc"}, timeout=10).status_code == 401


def test_the_admin_token_comes_from_the_flag_the_env_or_the_file_up_wrote(up):
    token = up.admin["Authorization"].removeprefix("Bearer ")
    refused = cli(up, "list", "-q", token=False)
    assert refused.returncode == 1 and "401" in refused.stderr and "--token" in refused.stderr
    assert cli(up, "list", "-q", "--token", "wrong").returncode == 1
    listed = cli(up, "list", "-q", "--token", token, token=False)
    assert listed.stdout.split() == ["fc", "fd"], (listed.returncode, listed.stderr)
    assert cli(up, "list", "-q", token=False, env={"SLLM_GATEWAY_TOKEN": token}).returncode == 0


def test_generated_tokens_can_be_passed_as_a_flag_value():
    # an urlsafe token began with "-" in a CI run, and `--token TOKEN` read it as an option (exit 2)
    factories = [f.default_factory for f in dataclasses.fields(LocalCluster) if f.name.endswith("_token")]
    assert len(factories) == 3
    tokens = [make() for make in factories for _ in range(100)]
    assert all(len(t) == 64 and set(t) <= set("0123456789abcdef") for t in tokens) and len(set(tokens)) == 300


def test_remove_by_name_and_by_stack_file(up):
    removed = cli(up, "remove", "fc")
    assert removed.returncode == 0 and removed.stdout == "Deleting: fc.\nRemoving old function.\n", removed.stderr
    again = cli(up, "remove", "fc")
    assert again.returncode == 1 and "fc: 404 function fc is not deployed" in again.stderr
    by_stack = cli(up, "remove", "-f", str(up.workdir.parent / "fd.yml"), "--filter", "fd")
    assert by_stack.returncode == 0, by_stack.stderr
    assert cli(up, "list", "-q").stdout == ""
    assert cli(up, "remove").returncode == 2


@pytest.mark.parametrize("verb", ["list", "describe", "logs", "remove", "deploy"])
def test_readme_lists_every_flag_of_the_gateway_verbs(verb):
    from sllm_faas.runtime.local.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, verb)
    readme = (ROOT / "README.md").read_text()
    flags = [o for a in parser._actions for o in a.option_strings if o != "--help" and o != "-h"]
    missing = [f for f in flags if f not in readme]
    assert not missing, f"README.md does not mention sllm-faas {verb} {missing}"
    assert f"`sllm-faas {verb} " in readme and "GET /system/logs" in readme
