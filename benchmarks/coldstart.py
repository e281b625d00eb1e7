"""Cold start and decode speed of the function runtime, against the floor and a plain transformers runtime.

    python benchmarks/coldstart.py [--runs 5] [--threads 2] [--decode-tokens 128] [--json OUT]
    python benchmarks/coldstart.py --families [llama3,qwen3,...] [--runs 3]   # each native family, same tiny model

In the same run, with SmolLM2-135M-Instruct (bf16) in the DRAM tier (/dev/shm), each sample a
fresh process:
- floor:     `python -c "import torch"`, spawn to exit;
- sllm:      `sllm-faas serve` (gunicorn), spawn to the first streamed token of a chat request;
- baseline:  a plain runtime: AutoTokenizer + AutoModelForCausalLM.from_pretrained on the safetensors
             folder, chat template, generate -> first token;
and decode throughput: one stream through our HTTP server vs transformers' generate loop (tokens
after the first, per second), plus the aggregate of 8 concurrent streams through our server.

--families: the same measurements (no floor) for each native family on a seeded random bf16 model of the
same shape (12 layers, hidden 512, 8 query / 4 KV heads of 64, MLP 1536, tied embeddings: 38M parameters)
with the character tokenizer of examples/qwen3, built and converted once into the examples' cache.
"""

from __future__ import annotations

import argparse
import json
import math
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

from examples.cache import cache_root, cached_checkpoint  # noqa: E402
from examples.qwen3.prepare import VOCAB, save_random_model, versions_key  # noqa: E402
from examples.smollm2.prepare import prepare  # noqa: E402
from runtime.embedded_redis import free_tcp_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
DECODE_PROMPT = "Write a long story about a lighthouse keeper."
TARGETS = {"sllm_vs_floor": 1.5, "baseline_vs_sllm": 2.0, "decode_vs_transformers": 1.0}
FAMILIES = ("llama3", "qwen3", "phi3", "gemma2", "gemma3", "mistral")
FAMILY_RECIPE = 1  # bump when family_config's shapes change

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


def family_config(name: str):
    """The benchmark's model in one family: same shape for all, each family's own switches at their defaults."""
    import transformers as tf

    shape = dict(vocab_size=len(VOCAB), hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=VOCAB.index("<|im_end|>"),
                 pad_token_id=VOCAB.index("<|endoftext|>"))
    if name == "llama3":
        return tf.LlamaConfig(**shape, rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 1024})
    if name == "qwen3":
        return tf.Qwen3Config(**shape)
    if name == "phi3":
        return tf.Phi3Config(**shape)
    if name == "gemma2":
        return tf.Gemma2Config(**shape, query_pre_attn_scalar=64)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**shape, query_pre_attn_scalar=64)
    if name == "mistral":
        return tf.MistralConfig(**shape)
    raise ValueError(f"{name!r} is not one of {', '.join(FAMILIES)}")


def family_model(name: str) -> dict[str, Path]:
    """{"hf", "sllm"} of the family's benchmark model, built and converted once (cached by versions)."""
    base = cache_root() / f"bench-{name}-38m-r{FAMILY_RECIPE}-{versions_key()}"
    return cached_checkpoint(base, lambda folder: save_random_model(family_config(name), folder, "bfloat16"))


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
        deadline, last = self.started + timeout, "none"
        session = requests.Session()
        while time.perf_counter() < deadline:
            try:
                with session.post(self.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
                    if response.status_code != 200:  # 503 while loading
                        last = f"{response.status_code} {response.text[:300]}"
                        time.sleep(0.005)
                        continue
                    for line in response.iter_lines():  # text, or the finish of a token that decodes to none
                        if line.startswith(b"data: ") and (b'"content": "' in line and b'"content": ""' not in line
                                                           or b'"finish_reason": "' in line):
                            return time.perf_counter() - self.started
            except requests.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the runtime exited with status {self.process.returncode}") from None
                time.sleep(0.005)
        raise TimeoutError(f"no token from the runtime in {timeout} s (last answer: {last})")

    def ready_body(self) -> dict[str, Any]:
        return requests.get(self.url + "/_/ready", timeout=10).json()

    def stream_rate(self, max_tokens: int) -> float:
        """Tokens after the first per second of one stream: the usage's token count (a token that decodes to no
        text, such as a special one from a random model, sends no chunk) over the first to the last text chunk."""
        body = {"prompt": DECODE_PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        times, tokens = [], None
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
        return (tokens - 1) / (times[-1] - times[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def sllm_cold_start(model_dir: Path, threads: int) -> tuple[float, dict[str, Any]]:
    runtime = Runtime(model_dir, threads)
    try:
        return runtime.first_token(), runtime.ready_body()["cold_start"]
    finally:
        runtime.stop()


def concurrent_rate(runtime: Runtime, tokens: int, streams: int) -> float:
    """Tokens per second over `streams` requests sent at once."""
    body = {"prompt": DECODE_PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: requests.post(runtime.url + "/v1/completions", json=body,
                                                        timeout=600).json(), range(streams)))
    return sum(r["usage"]["completion_tokens"] for r in results) / (time.perf_counter() - start)


def decode_rates(model_dir: Path, hf_dir: Path, threads: int, tokens: int, runs: int,
                 streams: int = 8) -> dict[str, Any]:
    """One stream through our server vs transformers' generate (medians of `runs`), and the aggregate of
    `streams` concurrent streams through our server (skipped when 0)."""
    runtime = Runtime(model_dir, threads)
    try:
        runtime.first_token()
        runtime.stream_rate(8)
        ours = [runtime.stream_rate(tokens) for _ in range(runs)]
        aggregate = concurrent_rate(runtime, tokens, streams) if streams else None
    finally:
        runtime.stop()
    theirs = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", TRANSFORMERS_DECODE_CHILD, str(hf_dir), str(threads), str(tokens),
                              DECODE_PROMPT], capture_output=True, text=True, check=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1])["rate"])
    return {"sllm_tok_s": statistics.median(ours), "transformers_tok_s": statistics.median(theirs),
            "sllm_samples": ours, "transformers_samples": theirs, "sllm_8_streams_aggregate_tok_s": aggregate}


def measure(paths: dict[str, Path], args, with_floor: bool) -> tuple[list, list, list, list, dict]:
    """Floor (if asked), our cold start, transformers' and both decode rates, with the model in /dev/shm."""
    staging = Path(tempfile.mkdtemp(prefix="sllm-coldstart-", dir="/dev/shm"))
    try:
        model_dir, hf_dir = staging / "sllm", staging / "hf"
        shutil.copytree(paths["sllm"], model_dir)
        shutil.copytree(paths["hf"], hf_dir)
        floor, ours, baseline, breakdowns = [], [], [], []
        for run in range(args.runs):  # interleaved, so drift on a shared machine hits every contender alike
            if with_floor:
                floor.append(time_floor(args.threads))
            seconds, breakdown = sllm_cold_start(model_dir, args.threads)
            ours.append(seconds)
            breakdowns.append(breakdown)
            baseline.append(time_baseline(hf_dir, args.threads))
            print(f"run {run + 1}/{args.runs}: " + (f"floor {floor[-1]:.3f}s  " if with_floor else "") +
                  f"sllm {ours[-1]:.3f}s  transformers {baseline[-1]:.3f}s", flush=True)
        decode = decode_rates(model_dir, hf_dir, args.threads, args.decode_tokens, args.runs,
                              streams=8 if with_floor else 0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return floor, ours, baseline, breakdowns, decode


def families_main(args) -> int:
    """--families: each native family's cold start and decode against transformers, same model shape."""
    from safetensors import safe_open

    rows = {}
    for name in args.families:
        paths = family_model(name)
        with safe_open(paths["hf"] / "model.safetensors", "pt") as handle:
            params = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
        print(f"== {name}: {params / 1e6:.1f}M parameters, bf16", flush=True)
        try:
            _, ours, baseline, breakdowns, decode = measure(paths, args, with_floor=False)
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:  # the other families still run
            print(f"{name} failed: {exc}", flush=True)
            rows[name] = {"parameters": params, "error": f"{type(exc).__name__}: {exc}"}
            continue
        rows[name] = {
            "model_type": json.loads((paths["hf"] / "config.json").read_text())["model_type"], "parameters": params,
            "decoder": breakdowns[0]["decoder"], "sllm_first_token_s": statistics.median(ours),
            "sllm_ready_s": statistics.median(b["process_start_to_ready_s"] for b in breakdowns),
            "transformers_first_token_s": statistics.median(baseline),
            "samples": {"sllm": ours, "transformers": baseline}, "sllm_breakdowns": breakdowns, "decode": decode,
            "ratios": {"transformers_vs_sllm_first_token": statistics.median(baseline) / statistics.median(ours),
                       "decode_vs_transformers": decode["sllm_tok_s"] / decode["transformers_tok_s"]}}
    shape = {k: v for k, v in family_config("qwen3").to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings")}
    report = {"date": now_utc(), "machine": machine_info(Path("/dev/shm")),
              "model": "seeded random bf16, one shape for every family (family_config), examples/qwen3's character "
                       "tokenizer", "shape": shape,
              "tier": "dram (/dev/shm)", "threads": args.threads, "runs": args.runs,
              "decode_tokens": args.decode_tokens, "families": rows}
    lines = [
        f"# Cold start and decode per native family, {report['date']}", "",
        f"{report['machine']['cpu_model']}, {report['machine']['nproc']} CPUs, torch threads {args.threads}; one "
        f"seeded random bf16 model shape for every family ({next(iter(rows.values()))['parameters'] / 1e6:.1f}M "
        f"parameters: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads of {shape['head_dim']}, MLP "
        f"{shape['intermediate_size']}, {shape['vocab_size']}-token character vocabulary, tied embeddings) in "
        f"/dev/shm; {args.runs} fresh processes each, medians; decode: {args.decode_tokens} tokens after the "
        "first, one stream.", "",
        "| family | decoder | sllm spawn -> ready (s) | sllm spawn -> first token (s) | transformers from_pretrained "
        "+ first token (s) | transformers / sllm | decode sllm (tok/s) | decode transformers (tok/s) | "
        "sllm / transformers |", "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:200]} |" + " |" * 7)
            continue
        lines.append(f"| {name} | {row['decoder']} | {row['sllm_ready_s']:.3f} | {row['sllm_first_token_s']:.3f} | "
                     f"{row['transformers_first_token_s']:.3f} | "
                     f"{row['ratios']['transformers_vs_sllm_first_token']:.2f}x | {row['decode']['sllm_tok_s']:.1f} | "
                     f"{row['decode']['transformers_tok_s']:.1f} | {row['ratios']['decode_vs_transformers']:.2f}x |")
    print("\n".join(lines))
    write_results(args.json or results_path("coldstart-families"), report, "\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every runtime (default 2)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/coldstart[-families]-DATE-MACHINE.json")
    parser.add_argument("--families", nargs="?", const=",".join(FAMILIES), type=lambda v: v.split(","),
                        help=f"measure each native family instead of SmolLM2 (default all: {','.join(FAMILIES)})")
    args = parser.parse_args()

    if args.families:
        return families_main(args)
    floor, ours, baseline, breakdowns, decode = measure(prepare(), args, with_floor=True)
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
