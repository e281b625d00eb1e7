"""Cold start and decode speed of the function runtime, against the floor and a plain transformers runtime.

    python benchmarks/coldstart.py [--runs 5] [--threads 2] [--decode-tokens 128] [--json OUT]
    python benchmarks/coldstart.py --families [llama3,qwen3,...] [--runs 3]   # each native family, same tiny model
    python benchmarks/coldstart.py --pool [--runs 5]   # pre-warmed runtimes: assignment -> ready, via the gateway

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

--pool: SmolLM2 in /dev/shm; per run, interleaved: the floor, then a fresh pooled member (made by a
zygote of runtime/local/pool.py run in this process) assigned the model: assignment -> ready and -> first
streamed token, with its breakdown. The first run is the model's first start in that pool (its tokenizer is
read); the pool then has the zygote prepare it, so later members find the tokenizer preloaded: the medians
are of those later runs, the first is reported beside them; the memory an idle member and the zygote hold
(USS/PSS/RSS); then,
through `sllm-faas up --nodes 1` with the model in the node's DRAM tier and the pool full, a streamed
request at zero -> its first token.
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
from sllm_faas.runtime.embedded_redis import free_tcp_port  # noqa: E402

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
            [sys.executable, "-m", "sllm_faas", "serve", str(model_dir), "--port", str(self.port),
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


def memory_kib(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of `pid`, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return {"rss_kib": fields["Rss"], "pss_kib": fields["Pss"],
            "uss_kib": fields["Private_Clean"] + fields["Private_Dirty"]}


def pooled_start(pools, model_dir: Path, build: Path, threads: int, logs: Path) -> tuple[float, float, dict]:
    """Take the fresh idle member, assign it SmolLM2: (assignment -> ready s, -> first streamed token s, breakdown)."""
    while not pools.nodes["n0"].members:
        time.sleep(0.005)
    member = pools.take("n0")
    port = free_tcp_port()
    runtime = Runtime.__new__(Runtime)   # the HTTP helpers, around a process we did not spawn
    runtime.port, runtime.url, runtime.process = port, f"http://127.0.0.1:{port}", member.process
    env = {**os.environ, "SLLM_MODEL": str(model_dir), "SLLM_TORCH_THREADS": str(threads),
           "SLLM_SERVED_MODEL_NAME": "m"}
    runtime.started = time.perf_counter()
    assigned = time.time()
    if not member.assign({"env": env, "cwd": str(build), "log": str(logs / f"{member.id}.log"), "port": port,
                          "assigned_at": assigned, "app": "index:app"}):
        raise RuntimeError(f"member {member.id} refused its assignment")
    try:
        first = runtime.first_token()
        cold = runtime.ready_body()["cold_start"]
    finally:
        from sllm_faas.common.processes import stop_process_group

        stop_process_group(member.process, grace_s=5)
    return cold["process_start_to_ready_s"], first, cold


def gateway_first_tokens(model_dir: Path, runs: int, work: Path) -> list[dict]:
    """`sllm-faas up --nodes 1 --slots 2 --pool-size 1`: per run, scale to zero, wait for a full pool, then stream a
    request at zero and time its first token (the model is in the node's DRAM tier)."""
    import signal

    import yaml

    from sllm_faas.runtime.node_loader.client import LoaderClient

    store = work / "store"
    store.mkdir(parents=True)
    (store / "m").symlink_to(model_dir)
    state_file = work / "cluster.json"
    up = subprocess.Popen([sys.executable, "-m", "sllm_faas", "up", "--nodes", "1", "--slots", "2", "--port",
                           str(free_tcp_port()), "--model-store", str(store), "--workdir", str(work / "up"),
                           "--build-root", str(work / "build"), "--state-file", str(state_file), "--pool-size", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    samples = []
    try:
        while not state_file.exists():
            if up.poll() is not None:
                raise RuntimeError("sllm-faas up exited")
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        gateway, admin = state["gateway"], {"Authorization": "Bearer " + Path(state["token_file"]).read_text()}
        stack = work / "stack.yml"
        stack.write_text(yaml.safe_dump({"version": 1.0, "provider": {"name": "openfaas"}, "functions": {"f": {
            "lang": "sllm-python", "handler": str(Path(__file__).resolve().parents[1] / "examples/smollm2/function"),
            "environment": {"SLLM_MODEL": "m", "SLLM_TORCH_THREADS": "2"}}}}))
        subprocess.run([sys.executable, "-m", "sllm_faas", "deploy", "-f", str(stack), "-g", gateway, "--build-dir",
                        str(work / "build")], check=True, capture_output=True)
        LoaderClient(next(iter(state["nodes"].values()))).stage_and_wait("m", "dram", timeout=300)
        body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}  # any served name
        for _ in range(runs + 1):   # the first start warms the node (leases, page cache of the build): not counted
            requests.post(f"{gateway}/system/scale-function/f", json={"replicas": 0}, headers=admin, timeout=30)
            while requests.get(f"{gateway}/system/function/f", headers=admin, timeout=10).json()["replicas"]:
                time.sleep(0.05)
            while not all(len(p["idle"]) == p["size"] for p in requests.get(
                    f"{gateway}/system/pools", headers=admin, timeout=10).json()):
                time.sleep(0.05)
            started, first, cold, lines = time.perf_counter(), None, {}, []
            with requests.post(f"{gateway}/function/f/v1/chat/completions", json=body, stream=True,
                               timeout=300) as response:
                for line in response.iter_lines(decode_unicode=True):
                    lines.append(line)
                    if line.startswith(": sllm cold-start phase=ready"):
                        cold = json.loads(line.split("cold_start=", 1)[1])
                    elif first is None and line.startswith("data: {") and '"content": "' in line \
                            and '"content": ""' not in line:
                        first = time.perf_counter() - started
            if first is None:
                raise RuntimeError(f"no token through the gateway: {response.status_code} {lines[-6:]}")
            samples.append({"first_token_s": first, "cold_start": cold})
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=120)
    return samples[1:]


def pool_main(args) -> int:
    """--pool: the pooled cold start against the floor, in the same run (module doc)."""
    from concurrent.futures import ThreadPoolExecutor as Spawner

    from sllm_faas.runtime.local.build import shrinkwrap
    from sllm_faas.runtime.local.pool import Pools

    staging = Path(tempfile.mkdtemp(prefix="sllm-coldstart-pool-", dir="/dev/shm"))
    work = Path(tempfile.mkdtemp(prefix="sllm-coldstart-pool-"))
    spawner = Spawner(1)
    pools = None
    try:
        model_dir = staging / "sllm"
        shutil.copytree(prepare()["sllm"], model_dir)
        build = shrinkwrap("sllm-python", Path(__file__).resolve().parents[1] / "examples/smollm2/function",
                           work / "build")
        pools = Pools(["n0"], 1, work, lambda popen: spawner.submit(popen).result())
        floor, ready, first, breakdowns, memory = [], [], [], [], []
        for run in range(args.runs):
            floor.append(time_floor(args.threads))
            while not pools.nodes["n0"].members or pools.nodes["n0"].status()["unprepared"]:
                time.sleep(0.005)
            time.sleep(1.0)   # let the fresh member settle before its memory is read
            zygote = pools.nodes["n0"].zygote.pid
            memory.append({"member": memory_kib(pools.nodes["n0"].members[0].process.pid),
                           "zygote": memory_kib(zygote)})
            seconds, token, cold = pooled_start(pools, model_dir, build, args.threads, work)
            ready.append(seconds)
            first.append(token)
            breakdowns.append(cold)
            print(f"run {run + 1}/{args.runs}: floor {floor[-1]:.3f}s  pooled ready {seconds:.3f}s  first token "
                  f"{token:.3f}s  tokenizer {cold['tokenizer']}", flush=True)
        pools.stop()
        pools = None
        gateway = gateway_first_tokens(model_dir, args.runs, work / "gateway")
    finally:
        if pools is not None:
            pools.stop()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median
    later = slice(1, None) if len(ready) > 1 else slice(None)   # the model prepared in the pool (module doc)
    medians = {"floor_import_torch_s": median(floor), "pooled_assign_to_ready_s": median(ready[later]),
               "pooled_assign_to_first_token_s": median(first[later]),
               "first_pooled_start_of_the_model_ready_s": ready[0],
               "gateway_at_zero_to_first_token_s": median(g["first_token_s"] for g in gateway),
               "idle_member_uss_mib": median(m["member"]["uss_kib"] for m in memory) / 1024,
               "idle_member_pss_mib": median(m["member"]["pss_kib"] for m in memory) / 1024,
               "idle_member_rss_mib": median(m["member"]["rss_kib"] for m in memory) / 1024,
               "zygote_rss_mib": median(m["zygote"]["rss_kib"] for m in memory) / 1024}
    ratios = {"pooled_ready_vs_floor": medians["pooled_assign_to_ready_s"] / medians["floor_import_torch_s"],
              "pooled_ready_vs_floor_per_run": median(r / f for r, f in zip(ready[later], floor[later], strict=True))}
    targets = {"pooled_assign_to_ready_s": 0.25, "pooled_ready_vs_floor": 0.2, "gateway_at_zero_to_first_token_s": 0.5}
    report = {"date": now_utc(), "machine": machine_info(Path("/dev/shm")), "model": "SmolLM2-135M-Instruct bf16",
              "tier": "dram (/dev/shm)", "threads": args.threads, "runs": args.runs,
              "load_average": os.getloadavg(), "medians": medians, "ratios": ratios, "targets": targets,
              "samples": {"floor": floor, "pooled_ready": ready, "pooled_first_token": first, "memory": memory,
                          "gateway": gateway}, "pooled_breakdowns": breakdowns}
    keys = ("imports_s", "staging_wait_s", "load_s", "build_s", "warming_s", "process_start_to_ready_s")
    lines = [
        f"# Cold start from a pre-warmed pool, {report['date']}", "",
        f"{report['machine']['cpu_model']}, {report['machine']['nproc']} CPUs, torch threads {args.threads}; "
        f"SmolLM2-135M-Instruct bf16 in /dev/shm; {args.runs} runs, each a fresh member (and a fresh floor "
        f"process), medians (pooled: of runs 2.., run 1 beside them). Load average at the end "
        f"{report['load_average'][0]:.1f} (this benchmark keeps one to two CPUs busy itself: above 2, other work "
        "shared the machine and absolute times are noisy); the ratio is from the same run.", "",
        "| what | seconds |", "|---|---:|",
        f"| floor: python -c 'import torch' (to exit) | {medians['floor_import_torch_s']:.3f} |",
        f"| pooled member: assignment -> ready | {medians['pooled_assign_to_ready_s']:.3f} |",
        f"| the same, the model's first start in the pool (tokenizer not preloaded yet; run 1) | "
        f"{medians['first_pooled_start_of_the_model_ready_s']:.3f} |",
        f"| pooled member: assignment -> first streamed token | {medians['pooled_assign_to_first_token_s']:.3f} |",
        f"| through the gateway: request at zero -> first streamed token (model in DRAM, pool full) | "
        f"{medians['gateway_at_zero_to_first_token_s']:.3f} |", "",
        f"- pooled ready / floor = {ratios['pooled_ready_vs_floor']:.2f}x of the medians, "
        f"{ratios['pooled_ready_vs_floor_per_run']:.2f}x the median of each run's own ratio (target <= "
        f"{targets['pooled_ready_vs_floor']}x); pooled ready {medians['pooled_assign_to_ready_s']:.3f} s (target <= "
        f"{targets['pooled_assign_to_ready_s']} s); gateway at zero -> first token "
        f"{medians['gateway_at_zero_to_first_token_s']:.3f} s (target <= "
        f"{targets['gateway_at_zero_to_first_token_s']} s)",
        f"- memory of one idle member: USS {medians['idle_member_uss_mib']:.1f} MiB (its own pages), PSS "
        f"{medians['idle_member_pss_mib']:.1f} MiB, RSS {medians['idle_member_rss_mib']:.1f} MiB (mostly shared "
        f"with the zygote); the zygote: RSS {medians['zygote_rss_mib']:.1f} MiB", "",
        "pooled breakdown (median of runs 2.., seconds): " + ", ".join(
            f"{key} {median(b[key] for b in breakdowns[later]):.3f}" for key in keys),
        "run 1's breakdown (seconds): " + ", ".join(f"{key} {breakdowns[0][key]:.3f}" for key in keys),
        "tokenizer per pooled run: " + ", ".join(b.get("tokenizer", "?") for b in breakdowns),
        "gateway starts' breakdown (median, seconds): " + ", ".join(
            f"{key} {median(g['cold_start'].get(key, 0) for g in gateway):.3f}" for key in keys),
    ]
    print("\n".join(lines))
    write_results(args.json or results_path("coldstart-pool"), report, "\n".join(lines))
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
    parser.add_argument("--pool", action="store_true", help="measure starts from a pool of pre-warmed runtimes")
    args = parser.parse_args()

    if args.pool:
        return pool_main(args)
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
            ("imports_s", "staging_wait_s", "load_s", "build_s", "warming_s", "process_start_to_ready_s")),
    ]
    print("\n".join(lines))
    write_results(args.json or results_path("coldstart"), report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
