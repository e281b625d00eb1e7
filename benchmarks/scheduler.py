"""Placement controller: decision latency and throughput with 1,000 nodes and 500 models in Redis.

    python benchmarks/scheduler.py [--nodes 1000] [--models 500] [--decisions 2000]

Fills the Redis at $REDIS_URL (else 127.0.0.1:6379, else an embedded one) under a private key prefix with
node records as loaders write them (8 slots, ~20 models in random tiers, measured bandwidths, some queues)
and 1,000 instance records, with every node heartbeating every 2 s as loaders do, then, in the same run:
- in-process: Placer.place (rank on the cached view + the atomic Lua booking), p50/p99;
- peer "read per decision": what a controller without the cached view does, read_cluster + rank per decision;
- HTTP: sequential POST /v1/placements to a real `sllm-faas controller` (gunicorn), p50/p99;
- throughput: 8 client threads against the controller (2 workers), decisions per second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import machine_info, now_utc, redis_url, results_path, write_results  # noqa: E402
from controller_process import GB, ControllerProcess, publish_model, publish_node  # noqa: E402

from sllm_faas.controller.booking import Booker  # noqa: E402
from sllm_faas.controller.cluster import ClusterCache, read_cluster  # noqa: E402
from sllm_faas.controller.placement import Placer  # noqa: E402
from sllm_faas.controller.scheduler import rank  # noqa: E402
from sllm_faas.redis_schema.keys import Keys  # noqa: E402
from sllm_faas.redis_schema.records import InstanceRecord  # noqa: E402


def populate(client: redis.Redis, prefix: str, nodes: int, models: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = [f"model-{i}" for i in range(models)]
    for name in names:
        publish_model(client, prefix, name, rng.randint(1, 140) * GB)
    for i in range(nodes):
        held = rng.sample(names, 20)
        tiers = {t: [m for m in held if rng.random() < p] for t, p in (("dram", 0.2), ("ssd", 0.8))}
        queue = {f"{rng.choice(names)}@dram": time.time() + rng.uniform(1, 60)} if rng.random() < 0.2 else None
        publish_node(client, prefix, f"node-{i:04d}", slots=8, dram=tiers["dram"], ssd=tiers["ssd"],
                     bw_remote=rng.uniform(0.5, 1.5) * GB, bw_ssd=rng.uniform(2, 4) * GB,
                     bw_dram=rng.uniform(15, 25) * GB, ttl=3600, queue=queue)
    pipe, keys = client.pipeline(), Keys(prefix)
    for i in range(nodes):
        instance = f"inst-{i:04d}"
        pipe.sadd(keys.instances, instance)
        pipe.hset(keys.instance(instance), mapping=InstanceRecord(
            id=instance, node=f"node-{rng.randrange(nodes):04d}", model=rng.choice(names), function="",
            address="http://10.0.0.1:8080", state="ready", slots=8, active=1, tokens=rng.randint(10, 2000),
            decode_tokens_per_s=30.0, prefill_tokens_per_s=2000.0, heartbeat_at=time.time()).to_hash())
        pipe.expire(keys.instance(instance), 3600)
    pipe.execute()
    return names


def heartbeat(client: redis.Redis, prefix: str, nodes: int, stop: threading.Event) -> None:
    """Each node's loader rewrites its record every 2 s: spread evenly, as real loaders are."""
    keys = Keys(prefix)
    while not stop.is_set():
        for i in range(0, nodes, max(1, nodes // 20)):
            pipe = client.pipeline(transaction=False)
            for j in range(i, min(nodes, i + max(1, nodes // 20))):
                pipe.hset(keys.node(f"node-{j:04d}"), "heartbeat_at", f"{time.time():.3f}")
            pipe.execute()
            if stop.wait(0.1):
                return


def estimate_vs_measured(url: str, runs: int, size: int, warmup: int) -> list[dict]:
    """A real node loader with a model on its SSD tier (page cache evicted, as for the loader's probe):
    the controller's estimate for placing it (q + size / bw_ssd) against the staging it then triggers,
    timed from the decision to the loader's `staged` event. The first `warmup` runs calibrate the
    loader's bandwidth from real stagings (its start-up probe only reads) and are not reported."""
    from common import evict_page_cache, write_model
    from loader_daemon import LoaderDaemon

    root = Path(tempfile.mkdtemp(prefix="sllm-bench-local-"))
    store = root / "remote"
    write_model(store / "bench-model", size)
    (root / "node").mkdir()
    prefix = f"sllm-bench:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(prefix)
    loader = LoaderDaemon(root / "node", store, url, prefix, node="node-a", dram_budget="4GiB", ssd_budget="8GiB",
                          probe_bytes="256MiB").start()
    results = []
    try:
        loader.wait_job(loader.client.stage("bench-model", "ssd"), timeout=300)
        placer = Placer(client, keys, ClusterCache(client, keys, 0.05), Booker(client, keys))
        for run in range(warmup + runs):
            loader.client.request("POST", "/v1/evict", {"model": "bench-model", "tier": "dram"})
            evict_page_cache((root / "node" / "ssd" / "bench-model").iterdir())
            time.sleep(1.0)  # the node record shows the model on SSD only again
            placer.cache.refresh()
            last = client.xrevrange(keys.events, count=1)
            since = last[0][0] if last else "0"
            placement = placer.place("bench-model")
            decided = time.time()
            while True:
                staged = [f for _, f in client.xrange(keys.events, min=f"({since}") if f["kind"] == "staged"
                          and f["model"] == "bench-model" and f["tier"] == "dram"]
                if staged:
                    break
                time.sleep(0.005)
            measured = float(staged[0]["ts"]) - decided
            client.zrem(keys.node_slots("node-a"), placement.booking)
            if run < warmup:
                continue
            results.append({"tier": placement.decision.tier, "estimate_s": round(placement.decision.estimate_s, 4),
                            "measured_s": round(measured, 4),
                            "error": round(placement.decision.estimate_s / measured - 1, 4)})
            print(f"  estimate {results[-1]['estimate_s']:.3f} s from {results[-1]['tier']}, measured "
                  f"{results[-1]['measured_s']:.3f} s ({results[-1]['error']:+.1%})", flush=True)
    finally:
        loader.stop()
        for key in client.scan_iter(match=Keys(prefix).every, count=1000):
            client.delete(key)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(function, count: int) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        function(i)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--local-runs", type=int, default=5, help="estimate-vs-measured runs with a real loader")
    parser.add_argument("--local-size", type=int, default=1 << 30, help="model bytes for those runs (default 1 GiB)")
    parser.add_argument("--local-warmup", type=int, default=3, help="calibrating runs before those (not reported)")
    args = parser.parse_args()
    url, server = redis_url()
    client = redis.Redis.from_url(url, decode_responses=True)
    prefix = f"sllm-bench:{uuid.uuid4().hex[:8]}:"
    keys = Keys(prefix)
    workdir = Path(__file__).resolve().parent / "results"
    rng = random.Random(1)
    try:
        started = time.perf_counter()
        names = populate(client, prefix, args.nodes, args.models)
        print(f"populated {args.nodes} nodes, {args.models} models, {args.nodes} instances "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        stop = threading.Event()
        beats = threading.Thread(target=heartbeat, args=(client, prefix, args.nodes, stop), daemon=True)
        beats.start()
        read = timed(lambda _: read_cluster(client, keys), 5)

        cache = ClusterCache(client, keys)
        placer = Placer(client, keys, cache, Booker(client, keys))
        placer.estimate(names[0])  # first view read
        in_process = timed(lambda _: placer.place(rng.choice(names)), args.decisions)
        peer = timed(lambda _: rank(read_cluster(client, keys).snapshot.updated(
            models={n: placer.model_info(n) for n in [rng.choice(names)]}), names[0]), 20)

        process = ControllerProcess(Path(tempfile.mkdtemp(prefix="sllm-bench-")), url, prefix, workers="2").start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {process.token}"}

            def post(_):
                connection.request("POST", "/v1/placements", json.dumps({"model": rng.choice(names)}), headers)
                response = connection.getresponse()
                response.read()
                assert response.status == 200, response.status

            timed(post, 50)  # both workers read their view
            over_http = timed(post, args.decisions)
            done = []

            def worker():
                conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
                for _ in range(args.decisions // 8):
                    conn.request("POST", "/v1/placements", json.dumps({"model": rng.choice(names)}), headers)
                    answer = conn.getresponse()
                    answer.read()
                    done.append(answer.status)

            threads = [threading.Thread(target=worker) for _ in range(8)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            throughput = len(done) / (time.perf_counter() - start)
            assert set(done) == {200}, set(done)
        finally:
            process.stop()
        stop.set()
        print("estimated vs measured load time with a real node loader (SSD -> DRAM):", flush=True)
        local = estimate_vs_measured(url, args.local_runs, args.local_size, args.local_warmup) if args.local_runs \
            else []
    finally:
        stop.set()
        for key in client.scan_iter(match=Keys(prefix).every, count=1000):
            client.delete(key)
        if server is not None:
            server.stop()

    ms = lambda v: round(v * 1e3, 3)  # noqa: E731
    report = {"date": now_utc(), "machine": machine_info(workdir), "nodes": args.nodes, "models": args.models,
              "instances": args.nodes, "decisions": args.decisions,
              "read_cluster_ms_median": ms(statistics.median(read)),
              "in_process_ms": {"p50": ms(percentile(in_process, 0.5)), "p99": ms(percentile(in_process, 0.99))},
              "read_per_decision_ms": {"p50": ms(percentile(peer, 0.5)), "p99": ms(percentile(peer, 0.99))},
              "http_ms": {"p50": ms(percentile(over_http, 0.5)), "p99": ms(percentile(over_http, 0.99))},
              "throughput_decisions_per_s": round(throughput, 1), "estimate_vs_measured": local}
    ratio = report["read_per_decision_ms"]["p50"] / report["in_process_ms"]["p50"]
    lines = [f"# Scheduler benchmark ({report['date']}, {report['machine']['cpu_model']}, "
             f"{report['machine']['nproc']} cores)", "",
             f"{args.nodes} nodes (8 slots, ~20 models each), {args.models} models, {args.nodes} instances in Redis; "
             f"{args.decisions} decisions per measurement.", "",
             "| measurement | p50 ms | p99 ms |", "|---|---|---|",
             f"| decision in-process (cached view + Lua booking) | {report['in_process_ms']['p50']} | "
             f"{report['in_process_ms']['p99']} |",
             f"| peer: read the cluster per decision + rank | {report['read_per_decision_ms']['p50']} | "
             f"{report['read_per_decision_ms']['p99']} |",
             f"| decision over HTTP (POST /v1/placements, sequential) | {report['http_ms']['p50']} | "
             f"{report['http_ms']['p99']} |", "",
             "- full cluster read (background, every 1 s; heartbeats every 2 s): "
             f"{report['read_cluster_ms_median']} ms median",
             f"- throughput, 8 client threads, 2 gunicorn workers: {report['throughput_decisions_per_s']} decisions/s "
             "(target >= 500)",
             f"- read-per-decision peer / ours, p50: {ratio:.1f}x", ""]
    if local:
        errors = [abs(r["error"]) for r in local]
        lines += [f"Estimated vs measured load time, real node loader, {args.local_size >> 20} MiB model on SSD "
                  "(page cache evicted) staged to DRAM on decision (target: within 20%):", "",
                  "| run | estimate s | measured s | error |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {r['estimate_s']} | {r['measured_s']} | {r['error']:+.1%} |"
                  for i, r in enumerate(local)]
        mean_estimate = statistics.mean(r["estimate_s"] for r in local)
        mean_measured = statistics.mean(r["measured_s"] for r in local)
        bias = mean_estimate / mean_measured - 1
        lines += ["", f"- median absolute error {statistics.median(errors):.1%}, worst {max(errors):.1%}; "
                  f"mean estimate {mean_estimate:.3f} s vs mean measured {mean_measured:.3f} s ({bias:+.1%})",
                  f"- measured spread in this run: {min(r['measured_s'] for r in local):.3f}-"
                  f"{max(r['measured_s'] for r in local):.3f} s for the same copy", ""]
    print("\n".join(lines))
    write_results(results_path("scheduler"), report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
