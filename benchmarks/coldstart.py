"""Cold start and decode speed of the function runtime, against the floor and a plain transformers runtime.

    python benchmarks/coldstart.py [--runs 5] [--threads 2] [--decode-tokens 128] [--json OUT]

In the same run, with SmolLM2-135M-Instruct (bf16) in the DRAM tier (/dev/shm), each sample a
fresh process:
- floor:     `python -c "import torch"`, spawn to exit;
- sllm:      `sllm-faas serve` (gunicorn), spawn to the first streamed token of a chat request;
- baseline:  a plain runtime: AutoTokenizer + AutoModelForCausalLM.from_pretrained on the safetensors
             folder, chat template, generate -> first token;
and decode throughput: one stream through our HTTP server vs transformers' generate loop (tokens
after the first, per second), plus the aggregate of 8 concurrent streams through our server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_info, now_utc, results_path, write_results  # noqa: E402

from examples.smollm2.prepare import prepare  # noqa: E402
from runtime.embedded_redis import free_tcp_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
DECODE_PROMPT = "Write a long story about a lighthouse keeper."
TARGETS = {"sllm_vs_floor": 1.5, "baseline_vs_sllm": 2.0, "decode_vs_transformers": 1.0}

BASELINE_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = tokenizer.apply_chat_template(json.loads(sys.argv[3]), add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)
model.generate(**ids, max_new_tokens=1, do_sample=False)
print("FIRST", flush=True)
"""

TRANSFORMERS_DECODE_CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
class Clock(BaseStreamer):
    def __init__(self): self.times = []
    def put(self, value): self.times.append(time.perf_counter())
    def end(self): pass
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = tokenizer(sys.argv[4], return_tensors="pt")
n = int(sys.argv[3])
model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
clock = Clock()
model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
times = clock.times[1:]  # the first put() is the prompt
print(json.dumps({"tokens": len(times), "rate": (len(times) - 1) / (times[-1] - times[0])}))
"""


def time_floor(threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def time_baseline(hf_dir: Path, threads: int) -> float:
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", BASELINE_CHILD, str(hf_dir), str(threads), json.dumps(MESSAGES)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:
        if line.startswith("FIRST"):
            elapsed = time.perf_counter() - start
            break
    else:
        raise RuntimeError("baseline child never produced a token")
    child.wait()
    return elapsed


class Runtime:
    """`sllm-faas serve` in a fresh process."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", str(model_dir), "--port", str(self.port),
             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "SLLM_TORCH_THREADS": str(threads), "SLLM_SERVED_MODEL_NAME": "m"})

    def first_token(self, timeout: float = 120) -> float:
        """Seconds from spawn to the first streamed token, retrying while the instance is not up/ready."""
        body = {"messages": MESSAGES, "max_tokens": 1, "temperature": 0, "stream": True}
        deadline = self.started + timeout
        session = requests.Session()
        while time.perf_counter() < deadline:
            try:
                with session.post(self.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
                    if response.status_code == 503:
                        time.sleep(0.005)
                        continue
                    for line in response.iter_lines():
                        if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
                            return time.perf_counter() - self.started
            except requests.ConnectionError:
                time.sleep(0.005)
        raise TimeoutError("no token from the runtime")

    def ready_body(self) -> dict[str, Any]:
        return requests.get(self.url + "/_/ready", timeout=10).json()

    def stream_times(self, max_tokens: int) -> list[float]:
        body = {"prompt": DECODE_PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        times = []
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter())
        return times[:-1]  # the last frame carries only the finish reason

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def sllm_cold_start(model_dir: Path, threads: int) -> tuple[float, dict[str, Any]]:
    runtime = Runtime(model_dir, threads)
    try:
        return runtime.first_token(), runtime.ready_body()["cold_start"]
    finally:
        runtime.stop()


def decode_rates(model_dir: Path, hf_dir: Path, threads: int, tokens: int, runs: int) -> dict[str, Any]:
    runtime = Runtime(model_dir, threads)
    try:
        runtime.first_token()
        runtime.stream_times(8)
        ours = []
        for _ in range(runs):
            times = runtime.stream_times(tokens)
            ours.append((len(times) - 1) / (times[-1] - times[0]))
        body = {"prompt": DECODE_PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: requests.post(runtime.url + "/v1/completions", json=body,
                                                            timeout=600).json(), range(8)))
        aggregate = sum(r["usage"]["completion_tokens"] for r in results) / (time.perf_counter() - start)
    finally:
        runtime.stop()
    theirs = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", TRANSFORMERS_DECODE_CHILD, str(hf_dir), str(threads), str(tokens),
                              DECODE_PROMPT], capture_output=True, text=True, check=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1])["rate"])
    return {"sllm_tok_s": statistics.median(ours), "transformers_tok_s": statistics.median(theirs),
            "sllm_samples": ours, "transformers_samples": theirs, "sllm_8_streams_aggregate_tok_s": aggregate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every runtime (default 2)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/coldstart-DATE-MACHINE.json")
    args = parser.parse_args()

    paths = prepare()
    staging = Path(tempfile.mkdtemp(prefix="sllm-coldstart-", dir="/dev/shm"))
    try:
        model_dir, hf_dir = staging / "sllm", staging / "hf"
        shutil.copytree(paths["sllm"], model_dir)
        shutil.copytree(paths["hf"], hf_dir)
        floor, ours, baseline, breakdowns = [], [], [], []
        for run in range(args.runs):  # interleaved, so drift on a shared machine hits every contender alike
            floor.append(time_floor(args.threads))
            seconds, breakdown = sllm_cold_start(model_dir, args.threads)
            ours.append(seconds)
            breakdowns.append(breakdown)
            baseline.append(time_baseline(hf_dir, args.threads))
            print(f"run {run + 1}/{args.runs}: floor {floor[-1]:.3f}s  sllm {ours[-1]:.3f}s  "
                  f"transformers {baseline[-1]:.3f}s", flush=True)
        decode = decode_rates(model_dir, hf_dir, args.threads, args.decode_tokens, args.runs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    medians = {"floor_import_torch_s": statistics.median(floor), "sllm_first_token_s": statistics.median(ours),
               "transformers_first_token_s": statistics.median(baseline)}
    ratios = {"sllm_vs_floor": medians["sllm_first_token_s"] / medians["floor_import_torch_s"],
              "baseline_vs_sllm": medians["transformers_first_token_s"] / medians["sllm_first_token_s"],
              "decode_vs_transformers": decode["sllm_tok_s"] / decode["transformers_tok_s"]}
    report = {"date": now_utc(), "machine": machine_info(Path("/dev/shm")), "model": "SmolLM2-135M-Instruct bf16",
              "tier": "dram (/dev/shm)", "threads": args.threads, "runs": args.runs, "medians": medians,
              "samples": {"floor": floor, "sllm": ours, "transformers": baseline}, "sllm_breakdowns": breakdowns,
              "decode": decode, "ratios": ratios, "targets": TARGETS}
    lines = [
        f"# Cold start, {report['date']}", "",
        f"{report['machine']['cpu_model']}, {report['machine']['nproc']} CPUs, torch threads {args.threads}; "
        f"SmolLM2-135M-Instruct bf16 in /dev/shm; {args.runs} fresh processes each, medians.", "",
        "| contender | spawn -> first token (s) |", "|---|---:|",
        f"| floor: python -c 'import torch' (to exit) | {medians['floor_import_torch_s']:.3f} |",
        f"| sllm-faas serve (gunicorn, HTTP, streamed token) | {medians['sllm_first_token_s']:.3f} |",
        f"| transformers Auto* from_pretrained + generate | {medians['transformers_first_token_s']:.3f} |", "",
        f"- sllm / floor = {ratios['sllm_vs_floor']:.2f}x (target <= {TARGETS['sllm_vs_floor']}x)",
        f"- transformers / sllm = {ratios['baseline_vs_sllm']:.2f}x (target >= {TARGETS['baseline_vs_sllm']}x)",
        f"- decode, one stream: sllm {decode['sllm_tok_s']:.1f} tok/s vs transformers generate "
        f"{decode['transformers_tok_s']:.1f} tok/s = {ratios['decode_vs_transformers']:.2f}x (target >= 1.0x)",
        f"- decode, 8 concurrent streams through the server: {decode['sllm_8_streams_aggregate_tok_s']:.1f} tok/s "
        "aggregate", "",
        "sllm cold-start breakdown (median of runs, seconds): " + ", ".join(
            f"{key} {statistics.median(b[key] for b in breakdowns):.3f}" for key in
            ("imports_s", "staging_wait_s", "load_s", "build_s", "first_forward_s", "process_start_to_ready_s")),
    ]
    print("\n".join(lines))
    write_results(args.json or results_path("coldstart"), report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
