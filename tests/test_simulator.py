"""The trace-driven simulator: hand-computed latencies, determinism, the scheduler core as the only
estimator, scenario validation and the `simulate` verb."""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

import sllm_faas.controller.scheduler as scheduler
import sllm_faas.controller.simulator as simulator_package
from sllm_faas.controller.keepalive import RANGE_S, CostKeepAlive
from sllm_faas.controller.simulator import policies
from sllm_faas.controller.simulator.config import (
    POLICY_NAMES,
    ScenarioError,
    load_scenario,
    parse_scenario,
    scenario_names,
)
from sllm_faas.controller.simulator.engine import RunResult, Simulation, run_policies, simulate
from sllm_faas.controller.simulator.report import p99_ratio_interval, scenario_markdown, write_plots
from sllm_faas.controller.simulator.workload import Request, generate
from sllm_faas.runtime.cli import main as cli_main

# Round numbers: a 2B-parameter model is 4 GB; prefill 1,000 tokens/s (4 TFLOPS / 2 FLOPs / 2e9 parameters),
# decode 10 tokens/s (40 GB/s / 4 GB). Tiers into GPU: DRAM 10 GB/s, SSD 2 GB/s, remote 1 GB/s.
TINY = """
name = "tiny"
seed = 3
policies = ["random", "least-allocated", "kserve-like", "sllm-release", "ours", "ours-no-migration"]

[gpus.toy]
memory_gb = 10
hbm_gb_per_s = 40
tflops = 4
source = "round numbers for hand computation"

[models.toy-2b]
params_b = 2
source = "round numbers for hand computation"

[datasets.toy]
input_mean = 100
input_cv = 0.5
output_mean = 20
output_cv = 0.5
max_tokens = 400
source = "round numbers"

[runtime]
gpu = "toy"
container_start_s = 1.0
keep_alive_s = 10.0
migration_overhead_s = 0.5
weights_fraction = 1.0
prefill_mfu = 1.0
decode_mbu = 1.0

[workload]
requests = 200
rate = 0.5
arrival = "gamma"
cv = 2.0
dataset = "toy"
sweep_rates = [0.25, 0.5]

[[nodes]]
count = 2
gpus = 1
dram_cache_gb = 100
ssd_cache_gb = 100
dram_gb_per_s = 10
ssd_gb_per_s = 2
remote_gb_per_s = 1

[[deploy]]
model = "toy-2b"
copies = 2
"""


def tiny(**changes) -> object:
    """The tiny scenario, with top-level or [section] keys replaced: tiny(runtime={"keep_alive_s": 5})."""
    data = tomllib.loads(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return parse_scenario(data, Path("tiny.toml"))


def requests(*specs: tuple[float, str, int, int]) -> list[Request]:
    return [Request(i, at, model, tokens_in, tokens_out) for i, (at, model, tokens_in, tokens_out) in enumerate(specs)]


TRACE = requests((0.0, "toy-2b#0", 100, 50), (1.0, "toy-2b#0", 200, 10), (6.5, "toy-2b#0", 100, 10),
                 (20.0, "toy-2b#1", 300, 10))


def test_hand_computed_latencies_ours():
    result = simulate(tiny(), "ours", TRACE)
    assert result.ttft_s.tolist() == pytest.approx([
        2.1,   # toy-2b#0 is on n0's SSD: 4 GB / 2 GB/s, overlapping the 1 s container start; + 100 / 1000 prefill
        6.3,   # t=1: n0's instance, still loading, is expected to be free in 1 s (ready) + a mean request (2.1 s),
               # sooner than n1's 4 s remote load: it waits; request 0 runs 50 tokens (to 7.1); + 0.2 prefill
        1.9,   # t=6.5: n0 is expected free after request 0 and then request 1 (~0.6 + 2.1 s) < 4 s remote: it waits;
               # request 1 ends at 8.3, + 0.1 prefill
        2.3,   # t=20: n0's idle instance expired at 19.4 (keep-alive 10 s); toy-2b#1 is on n1's SSD
    ])
    assert dict(result.cold_starts) == {"ssd": 2} and result.warm_starts == 0
    # GPU-seconds: n0 holds a GPU 0 -> 19.4 (9.4 + 10 keep-alive), n1 20 -> 33.3 (23.3 + 10)
    assert result.gpu_seconds == pytest.approx(19.4 + 13.3)


def test_hand_computed_latencies_kserve_like():
    result = simulate(tiny(), "kserve-like", TRACE)
    assert result.ttft_s.tolist() == pytest.approx([
        5.1,   # remote only, and the load starts once the container is up: 1 + 4 s
        5.2,   # the other node, from t=1: ready at 6
        0.8,   # t=6.5: no GPU free; waits for the second instance, idle at 7.2; 0.1 prefill
        5.3,   # t=20: 1 + 4 s, 0.3 prefill
    ])
    assert dict(result.cold_starts) == {"remote": 3}


def test_hand_computed_migration():
    # toy-2b#0 lives on n0 only; toy-2b#1 on n1 and n0. Remote is slow (0.5 GB/s), so when n0 is busy with a long
    # toy-2b#1 request, moving that request to n1 (which has its checkpoint) beats loading toy-2b#0 remotely.
    # Outputs average 1,000 tokens here, so at t=10 the long request is expected to run ~90 s more: waiting for
    # it loses to migrating it.
    scenario = tiny(nodes=[{**tomllib.loads(TINY)["nodes"][0], "remote_gb_per_s": 0.5}],
                    deploy=[{"model": "toy-2b"}, {"model": "toy-2b", "home_replicas": 2}],
                    datasets={"toy": {**tomllib.loads(TINY)["datasets"]["toy"], "output_mean": 1000}})
    trace = requests((0.0, "toy-2b#1", 100, 1000), (10.0, "toy-2b#0", 100, 10))
    result = simulate(scenario, "ours", trace)
    # request 0 on n0 (SSD tie with n1, broken by node id): ready at 2, decoding from 2.1.
    # t=10: the estimate is migrate (179 tokens / 1000 + 0.5 + 2 s SSD load on n1) + 2 s SSD load on n0 = 4.679 s,
    # against 8 s from remote on n1. The destination is ready at 12 and recomputes the 199 tokens generated by
    # then (0.699 s); at the handover (12.699) n0's GPU passes to toy-2b#0, loaded from SSD by 14.699.
    assert result.ttft_s.tolist() == pytest.approx([2.1, 14.699 + 0.1 - 10])
    assert result.migrations == 1 and dict(result.cold_starts) == {"ssd": 3}
    without = simulate(scenario, "ours-no-migration", trace)
    assert without.ttft_s.tolist() == pytest.approx([2.1, 8.1]) and without.migrations == 0


def test_dram_holds_a_checkpoint_past_its_window_only_when_its_restart_from_ssd_lands_in_the_tail():
    # One request for toy-2b#0 under the cost keep-alive (no histogram yet: the fixed 10 s window on the GPU).
    # SSD at 2 GB/s: loaded from n0's SSD (4 GB / 2 GB/s over the 1 s container start), first token at 2.1, idle at
    # 3.1 after 10 tokens at 10/s; a restart from SSD is 1 + 2 = 3 s, no tail: n0's DRAM holds it for the window.
    sim = Simulation(tiny(), "ours", requests((0.0, "toy-2b#0", 100, 10)), None, CostKeepAlive(10.0))
    assert sim.run().ttft_s.tolist() == pytest.approx([2.1])
    assert sim.cluster.nodes[0].dram.held_until == {"toy-2b#0": pytest.approx(3.1 + 10.0)}
    # SSD at 0.2 GB/s: the remote store (4 s) beats n0's SSD (20 s); on n1, first token at 4.1, idle at 5.1. A restart
    # from SSD would take 1 + 20 = 21 s, past TAIL_RESTART_S: n1's DRAM holds it for the histogram's range.
    slow_ssd = tiny(nodes=[{**tomllib.loads(TINY)["nodes"][0], "ssd_gb_per_s": 0.2}])
    sim = Simulation(slow_ssd, "ours", requests((0.0, "toy-2b#0", 100, 10)), None, CostKeepAlive(10.0))
    result = sim.run()
    assert result.ttft_s.tolist() == pytest.approx([4.1]) and result.gpu_seconds == pytest.approx(5.1 + 10.0)
    assert sim.cluster.nodes[1].dram.held_until == {"toy-2b#0": pytest.approx(5.1 + RANGE_S)}


def test_release_waits_for_a_node_holding_the_checkpoint():
    # toy-2b#0 is only on n0. While n0 is busy, the released scheduler does not consider n1 (remote).
    result = simulate(tiny(), "sllm-release", requests((0.0, "toy-2b#0", 100, 50), (1.0, "toy-2b#0", 100, 10)))
    # request 1 waits for n0's instance to finish (2.1 + 5 = 7.1), then prefills
    assert result.ttft_s.tolist() == pytest.approx([2.1, 7.1 + 0.1 - 1.0])
    assert dict(result.cold_starts) == {"ssd": 1}


def test_same_seed_same_results_and_another_seed_differs():
    scenario = tiny()
    first, second = run_policies(scenario), run_policies(scenario)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.ttft_s, b.ttft_s) and a.gpu_seconds == b.gpu_seconds
        assert a.cold_starts == b.cold_starts and a.migrations == b.migrations
    reseeded = run_policies(dataclasses.replace(scenario, seed=4))
    assert not np.array_equal(first[0].ttft_s, reseeded[0].ttft_s)


def test_every_request_is_served_under_every_policy():
    for result in run_policies(tiny(workload={"requests": 300, "rate": 2.0})):
        assert result.unserved == 0 and len(result.ttft_s) == 300 and (result.ttft_s > 0).all(), result.policy


# --- the scheduler core is the only estimator and decides ---

@pytest.fixture
def plans_calls(monkeypatch) -> list[tuple]:
    """(snapshot, model name) of every call to the scheduler core's plans() while the test runs."""
    calls = []
    real_plans = scheduler.plans

    def spy(snapshot, model_name):
        calls.append((snapshot, model_name))
        return real_plans(snapshot, model_name)

    monkeypatch.setattr(scheduler, "plans", spy)
    return calls


def test_startup_time_policies_decide_through_the_scheduler_core(monkeypatch, plans_calls):
    for name in ("ours", "ours-no-migration", "sllm-release"):
        plans_calls.clear()
        result = simulate(tiny(), name, generate(tiny()))
        assert plans_calls and sum(result.cold_starts.values()) <= len(plans_calls), name

    def poisoned(snapshot, model_name):
        raise AssertionError("availability-only policies must not call the scheduler core")

    monkeypatch.setattr(scheduler, "plans", poisoned)
    for name in ("random", "least-allocated", "kserve-like"):
        simulate(tiny(), name, TRACE)
    with pytest.raises(AssertionError):
        simulate(tiny(), "ours", TRACE)


def test_ours_follows_whatever_the_core_decides(monkeypatch):
    """If the core preferred the highest node id, ours would place there: the choice is the core's."""
    def highest_id_first(snapshot, model_name):
        return sorted(scheduler.rank(snapshot, model_name), key=lambda d: d.node, reverse=True)

    monkeypatch.setattr(scheduler, "plans", highest_id_first)
    result = simulate(tiny(), "ours", TRACE[:1])
    assert result.ttft_s.tolist() == pytest.approx([4.1])  # n1: remote 4 s instead of n0's SSD 2 s
    assert dict(result.cold_starts) == {"remote": 1}


def test_release_ranks_local_nodes_at_a_constant_25_gbps(plans_calls):
    simulate(tiny(), "sllm-release", TRACE[:1])
    ((snapshot, _),) = plans_calls
    assert [node.id for node in snapshot.nodes] == ["n0"] and not snapshot.instances
    assert set(snapshot.nodes[0].bandwidth.values()) == {policies.RELEASE_BANDWIDTH}


def _calls_and_names(tree: ast.AST) -> set[str]:
    return {node.id if isinstance(node, ast.Name) else node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Name | ast.Attribute)}


def test_one_decision_path_for_controller_and_simulator():
    """The controller's placement and the simulator decide through scheduler.plans only: neither ranks,
    shortlists or checks feasibility itself (a copy of the decision step in either fails here)."""
    import sllm_faas.controller.placement as placement

    tree = ast.parse(Path(placement.__file__).read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    used = _calls_and_names(functions["place"])  # place decides through _place_on_view (a retry on a fresh read)
    assert "_place_on_view" in used
    used |= _calls_and_names(functions["_place_on_view"])
    assert "plans" in used and not used & {"rank", "shortlist", "_decide", "feasible", "chain"}, used
    for path in Path(simulator_package.__file__).parent.glob("*.py"):
        used = _calls_and_names(ast.parse(path.read_text()))
        assert not used & {"rank", "shortlist", "_decide", "feasible", "first_feasible"}, (path.name, used)
    assert "plans" in _calls_and_names(ast.parse(Path(policies.__file__).read_text()))


def test_wait_for_a_local_instance_of_the_same_model():
    # t=2.1: n0's instance of toy-2b#0 starts decoding; it is expected to take the mean 20 tokens / 10 tok/s = 2 s,
    # sooner than a 4 s remote load on n1: the request waits, and the instance serves it warm at 3.1.
    trace = requests((0.0, "toy-2b#0", 100, 10), (2.1, "toy-2b#0", 100, 10))
    for name in ("ours", "ours-no-migration"):
        result = simulate(tiny(), name, trace)
        assert result.ttft_s.tolist() == pytest.approx([2.1, 3.1 + 0.1 - 2.1]), name
        assert dict(result.cold_starts) == {"ssd": 1}


def test_a_second_waiting_request_queues_behind_the_first():
    # t=2.1: two requests for toy-2b#0, whose one instance (n0) has just started decoding 20 tokens. The first waits
    # for it (expected 20 / 10 = 2 s, sooner than a 4 s remote load on n1). The second would be served after the
    # first: 2 s + a mean request (100 / 1000 + 20 / 10 = 2.1 s) = 4.1 s, so it loads on n1 (ready 1 + 4 = 6.1).
    trace = requests((0.0, "toy-2b#0", 100, 20), (2.1, "toy-2b#0", 100, 20), (2.1, "toy-2b#0", 100, 20))
    for name in ("ours", "ours-no-migration"):
        result = simulate(tiny(), name, trace)
        assert result.ttft_s.tolist() == pytest.approx([2.1, 4.1 + 0.1 - 2.1, 6.1 + 0.1 - 2.1]), name
        assert dict(result.cold_starts) == {"ssd": 1, "remote": 1}


def test_wait_for_a_loading_instance_of_the_same_model():
    # t=0: n0 loads toy-2b#0 from SSD, ready at 2 (2 s load, the container overlapping). t=0.5: a second request; the
    # loading instance is expected to end 1.5 s (ready) + a mean request (100 / 1000 + 20 / 10 = 2.1 s) = 3.6 s from
    # now, sooner than a 4 s remote load on n1: it waits. The instance serves the first request (2.0 -> 3.1), then
    # the second warm: 3.1 + 0.1 prefill.
    trace = requests((0.0, "toy-2b#0", 100, 10), (0.5, "toy-2b#0", 100, 10))
    for name in ("ours", "ours-no-migration"):
        result = simulate(tiny(), name, trace)
        assert result.ttft_s.tolist() == pytest.approx([2.1, 3.1 + 0.1 - 0.5]), name
        assert dict(result.cold_starts) == {"ssd": 1}
    # with 30-token outputs expected (3 s each), waiting is 1.5 + 3.1 = 4.6 s: n1 loads from remote, ready at 4.5
    # (the first request runs 100 tokens, to 12.1, so n0 does not free first)
    slow = tiny(datasets={"toy": {**tomllib.loads(TINY)["datasets"]["toy"], "output_mean": 30}})
    result = simulate(slow, "ours", requests((0.0, "toy-2b#0", 100, 100), (0.5, "toy-2b#0", 100, 10)))
    assert result.ttft_s.tolist() == pytest.approx([2.1, 4.5 + 0.1 - 0.5])
    assert dict(result.cold_starts) == {"ssd": 1, "remote": 1}


def test_wait_for_a_local_slot_beats_migrating_and_a_remote_load():
    # toy-2b#0 is on n0's SSD only, toy-2b#1 on both; n1's link is 0.5 GB/s (8 s remote). At t=2.1, n0 serves #1:
    # waiting for it (expected 2 s) then loading #0 from SSD (2 s) is 4 s; migrating it first is 0.1 + 0.5 + 2 s
    # (its tokens, b, #1 from n1's SSD), + 2 = 4.6 s; remote on n1 is 8 s. It waits: GPUs at 3.1, loaded at 5.1.
    scenario = tiny(nodes=[{**tomllib.loads(TINY)["nodes"][0], "remote_gb_per_s": 0.5}],
                    deploy=[{"model": "toy-2b"}, {"model": "toy-2b", "home_replicas": 2}])
    trace = requests((0.0, "toy-2b#1", 100, 10), (2.1, "toy-2b#0", 100, 10))
    for name in ("ours", "ours-no-migration"):
        result = simulate(scenario, name, trace)
        assert result.ttft_s.tolist() == pytest.approx([2.1, 5.1 + 0.1 - 2.1]), name
        assert result.migrations == 0 and dict(result.cold_starts) == {"ssd": 2}


def test_simulator_defines_no_estimator_of_its_own():
    """No function named like the scheduler's estimators, and no size divided by a bandwidth, anywhere in the
    simulator package: load and migration times come from sllm_faas.controller.scheduler."""
    estimators = {"rank", "load_time", "migration_time", "cluster_bandwidths", "estimate", "startup_time"}
    for path in Path(simulator_package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.name.lstrip("_") not in estimators, f"{path.name}: defines {node.name}"
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                left, right = ast.unparse(node.left).lower(), ast.unparse(node.right).lower()
                assert not ("size" in left and any(w in right for w in ("bandwidth", "_per_s", "rate", "bw"))), \
                    f"{path.name}:{node.lineno}: {ast.unparse(node)} estimates a transfer time"


def test_policy_names_match_the_registry():
    assert tuple(policies.POLICIES) == POLICY_NAMES


# --- scenarios ---

def test_builtin_scenarios_load():
    names = scenario_names()
    assert {"default", "paper-8gpu", "paper-4x4", "scale-1000"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        assert scenario.models and scenario.node_groups and scenario.policies


def test_paper_testbeds():
    single, cluster = load_scenario("paper-8gpu"), load_scenario("paper-4x4")
    assert [(g.count, g.gpus) for g in single.node_groups] == [(1, 8)] and single.gpu.name == "a5000"
    assert [(g.count, g.gpus) for g in cluster.node_groups] == [(4, 4)] and cluster.gpu.name == "a40"
    assert cluster.node_groups[0].bandwidth["remote"] == 1.25e9  # 10 Gbps


def test_scale_scenario_is_1000_nodes_and_10000_requests():
    scenario = load_scenario("scale-1000")
    assert sum(g.count for g in scenario.node_groups) == 1000 and scenario.workload.requests == 10_000


def test_trace_shape():
    scenario = tiny(workload={"requests": 2000, "rate": 4.0})
    trace = generate(scenario)
    arrivals = [r.arrival_s for r in trace]
    assert len(trace) == 2000 and arrivals == sorted(arrivals)
    assert [r.id for r in trace] == list(range(2000))
    assert 300 < len(trace) / arrivals[-1] * 100 < 500  # about 4 requests/s
    assert 80 < np.mean([r.input_tokens for r in trace]) < 120
    assert all(1 <= r.output_tokens <= 400 for r in trace)


@pytest.mark.parametrize(("changes", "field", "problem"), [
    ({"policies": ["ours", "fastest"]}, "policies", "unknown policy 'fastest'"),
    ({"workload": {"rate": -1.0}}, "workload.rate", "must be > 0"),
    ({"workload": {"requests": 0}}, "workload.requests", "must be >= 1"),
    ({"workload": {"sweep_rates": [0.5, -2]}}, "workload.sweep_rates[1]", "must be > 0"),
    ({"deploy": [{"model": "opt-7b"}]}, "deploy[0].model", "unknown model 'opt-7b'"),
    ({"runtime": {"gpu": "tpu"}}, "runtime.gpu", "unknown gpu 'tpu'"),
    ({"workload": {"arrival": "uniform"}}, "workload.arrival", "unknown arrival 'uniform'"),
    ({"workload": {"rate_per_s": 1.0}}, "workload.rate_per_s", "unknown field"),
    ({"nodes": [{"count": 2, "gpus": 1}]}, "nodes[0].dram_cache_gb", "missing"),
    ({"nodes": [{**tomllib.loads(TINY)["nodes"][0], "ssd_gb_per_s": "fast"}]}, "nodes[0].ssd_gb_per_s",
     "expected a number"),
    ({"deploy": [{"model": "opt-30b"}]}, "deploy[0].model", "needs 8 x toy GPUs"),
    ({"nodes": [{**tomllib.loads(TINY)["nodes"][0], "ssd_cache_gb": 3}]}, "nodes", "home copies"),
])
def test_bad_scenarios_name_the_file_and_field(changes, field, problem):
    with pytest.raises(ScenarioError) as error:
        tiny(**changes)
    assert f"tiny.toml: {field}" in str(error.value) and problem in str(error.value)


def test_catalog_errors_name_the_catalog(tmp_path):
    with pytest.raises(ScenarioError, match=r"tiny.toml: models.toy-2b.params_b: must be > 0"):
        tiny(models={"toy-2b": {"params_b": 0, "source": "x"}})


def test_unreadable_scenarios(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [")
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="no-such: no such file, and not a built-in scenario"):
        load_scenario("no-such")


# --- output ---

def test_simulate_verb_writes_the_table(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    assert cli_main(["simulate", str(scenario), "--out", str(tmp_path), "--no-plots", "--requests", "100",
                     "--policies", "least-allocated,ours", "--sweep"]) == 0
    table = (tmp_path / "simulate-tiny.md").read_text()
    assert "| least-allocated |" in table and "| ours |" in table and "| 0.25 |" in table
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["simulate", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such file" in capsys.readouterr().out


def test_plots_are_optional(tmp_path, monkeypatch, capsys):
    results = run_policies(tiny())
    assert "| ours |" in scenario_markdown(tiny(), results)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert write_plots(tmp_path / "x", results) == []
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = run_policies(tiny())
    sweep = [run_policies(tiny(), rate) for rate in (0.25, 0.5)]
    written = write_plots(tmp_path / "tiny", results, sweep)
    assert [p.name for p in written] == ["tiny-cdf.png", "tiny-rate.png"] and all(p.stat().st_size for p in written)


def test_azure_trace_replays_real_arrivals_and_token_counts():
    scenario = load_scenario("azure-conv")
    trace = generate(dataclasses.replace(scenario, workload=dataclasses.replace(scenario.workload, requests=4)))
    # the first rows of AzureLLMInferenceTrace_conv.csv, gaps in the same proportions
    assert [(r.input_tokens, r.output_tokens) for r in trace] == [(374, 44), (396, 109), (879, 55), (91, 16)]
    gaps = np.diff([r.arrival_s for r in trace])
    assert gaps[0] / gaps[1] == pytest.approx((50.9951690 - 46.6805900) / (51.2224670 - 50.9951690), rel=1e-6)
    assert (len(trace) - 1) / trace[-1].arrival_s == pytest.approx(scenario.workload.rate)  # time-scaled to the rate


def test_p99_ratio_interval_resamples_the_same_requests_under_both_policies():
    """Paired: a policy twice as slow on every request is 2x on every resample. One that differs only in its
    longest request of 200 spans from 1 (the p99 of 200 lies below the longest: a resample drawing it at most
    once sees no difference) to well above (drawn twice or more). Runs that served different requests have no
    interval."""
    def run(times) -> RunResult:
        return RunResult("s", "p", 1.0, np.asarray(times, dtype=float), 0.0)

    base = np.arange(1.0, 201.0)
    assert p99_ratio_interval(run(2 * base), run(base)) == pytest.approx((2.0, 2.0))
    assert p99_ratio_interval(run(base), run(base)) == pytest.approx((1.0, 1.0))
    low, high = p99_ratio_interval(run(np.append(base[:-1], 400.0)), run(base))
    assert low == pytest.approx(1.0) and 1.5 < high <= 400 / 200
    assert p99_ratio_interval(run(base[:-1]), run(base)) is None
    assert p99_ratio_interval(run([]), run([])) is None
    unserved = dataclasses.replace(run(base), unserved=1)
    assert p99_ratio_interval(unserved, run(base)) is None
