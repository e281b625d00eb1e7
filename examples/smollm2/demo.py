"""`make demo`: SmolLM2 on a local sllm-faas cluster, and where three cold starts spend their time.

1. converts the example model (cached after the first run) into the local model store;
2. starts `sllm-faas up --nodes 2` and deploys examples/smollm2/stack.yml;
3. asks a question with the openai client (the function scales from zero; the model is on SSD only);
4. scales to zero and asks again (the model is now in the node's DRAM tier), then once more (warm);
5. prints the cold-start breakdown of the three starts, and stops everything.

`up` keeps one pre-warmed runtime per node (--pool-size 1): a start that finds the node's member idle is
a pooled one, else a spawned `sllm-faas serve`; the `start` column says which.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"  # the name stack.yml asks for
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


class DemoFailed(RuntimeError):
    pass


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


def main() -> int:
    import openai
    import requests

    from examples.smollm2.prepare import cache_root, prepare
    from sllm_faas.runtime.embedded_redis import free_tcp_port
    from sllm_faas.runtime.node_loader.client import LoaderClient

    step("converting the example model (cached after the first run)")
    checkpoint = prepare()["sllm"]
    store = cache_root() / "store"
    store.mkdir(parents=True, exist_ok=True)
    link = store / MODEL
    if link.is_symlink() and link.resolve() != checkpoint.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(checkpoint)

    work = Path(tempfile.mkdtemp(prefix="sllm-demo-"))
    state_file = work / "cluster.json"
    step("starting the local cluster: Redis, controller, 2 node loaders, gateway")
    log = open(work / "up.log", "wb")  # noqa: SIM115 - closed at the end
    up = subprocess.Popen([sys.executable, "-m", "sllm_faas", "up", "--nodes", "2", "--port", str(free_tcp_port()),
                           "--model-store", str(store), "--workdir", str(work / "cluster"), "--state-file",
                           str(state_file), "--build-root", str(work / "build")],
                          stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: state_file.exists() or up.poll() is not None, "the cluster to start")
        if up.poll() is not None:
            raise DemoFailed(f"sllm-faas up exited:\n{(work / 'up.log').read_text()[-3000:]}")
        state = json.loads(state_file.read_text())
        gateway = state["gateway"]
        admin = {"Authorization": "Bearer " + Path(state["token_file"]).read_text()}  # for /system/ routes
        step(f"deploying examples/smollm2/stack.yml to {gateway}")
        deployed = subprocess.run([sys.executable, "-m", "sllm_faas", "deploy", "-f",
                                   str(ROOT / "examples" / "smollm2" / "stack.yml"), "-g", gateway, "--build-dir",
                                   str(work / "build")], capture_output=True, text=True, cwd=ROOT)
        if deployed.returncode != 0:
            raise DemoFailed(f"deploy failed: {deployed.stderr}")

        step("putting the model on each node's SSD tier only (the first start is a cold one from SSD)")
        for socket_path in state["nodes"].values():
            LoaderClient(socket_path).stage_and_wait(MODEL, "ssd", timeout=300)

        client = openai.OpenAI(base_url=f"{gateway}/function/smollm2/v1", api_key="unused", timeout=600)
        starts = []
        for label in ("cold, model on SSD", "cold, model in DRAM", "warm instance"):
            if label == "cold, model in DRAM":
                step("scaling the function to zero")
                requests.post(f"{gateway}/system/scale-function/smollm2", json={"replicas": 0}, headers=admin,
                              timeout=30)
                wait_for(lambda: requests.get(f"{gateway}/system/function/smollm2", headers=admin, timeout=10)
                         .json()["replicas"] == 0, "scale to zero")
            step(f"asking SmolLM2 ({label})")
            began = time.time()
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=32,
                                                                   temperature=0)
            answer = raw.parse().choices[0].message.content
            total = time.time() - began
            print(f"    answer: {answer!r}  ({total:.2f} s, instance {raw.headers['X-Sllm-Instance']} on "
                  f"{raw.headers['X-Sllm-Node']})", flush=True)
            if "Paris" not in answer:
                raise DemoFailed(f"unexpected answer: {answer!r}")
            starts.append((label, total, json.loads(raw.headers.get("X-Sllm-Cold-Start") or "{}"),
                           json.loads(raw.headers.get("X-Sllm-Placement") or "{}")))
        print_breakdown(starts)
        return 0
    except (DemoFailed, openai.OpenAIError, requests.RequestException, OSError) as exc:
        print(f"demo failed: {exc}\n(logs: {work})", file=sys.stderr)
        return 1
    finally:
        step("stopping the cluster")
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
        log.close()


def print_breakdown(starts: list) -> None:
    header = ["request", "start", "placed (tier)", "loaded from", "request s", "start->ready s", "imports",
              "staging wait", "load", "build", "first forward"]
    rows = []
    for label, total, cold, placement in starts:
        if cold:
            rows.append([label, cold.get("start", "spawn"),
                         f"{placement.get('tier')} (est {placement.get('estimate_s')} s)", cold["tier"],
                         f"{total:.2f}", f"{cold['process_start_to_ready_s']:.2f}", f"{cold['imports_s']:.2f}",
                         f"{cold['staging_wait_s']:.2f}", f"{cold['load_s']:.3f}", f"{cold['build_s']:.2f}",
                         f"{cold['warming_s']:.2f}"])
        else:
            rows.append([label, "warm", "-", "-", f"{total:.2f}"] + ["-"] * 6)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print("\nCold-start breakdown (seconds)")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    sys.exit(main())
