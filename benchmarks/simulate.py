"""Trace-driven simulator: the paper's scheduling comparison, and the time to simulate a 1,000-node cluster.

    python benchmarks/simulate.py [--scenarios default,paper-8gpu,paper-4x4,azure-conv] [--no-scale] [--no-plots]
    python benchmarks/simulate.py --scenarios "" --no-keepalive   # only the 1,000-node timing run

For each scenario: one trace at its base rate replayed under every policy (p50/p99 time to first token,
GPU-hours, cold starts by tier, migrations), then its sweep of request rates. Ratios printed are each
policy's p99 over ours (higher: ours is better). Then `scale-1000` (1,000 nodes x 10,000 requests) under
every policy, timed. Output: results/simulate-<date>-<machine>.md and .json, and the plots next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, machine_info, now_utc, results_path  # noqa: E402

import sllm_faas.controller.scheduler as scheduler  # noqa: E402
from sllm_faas.controller.keepalive import CostKeepAlive, FixedKeepAlive  # noqa: E402
from sllm_faas.controller.simulator.config import load_scenario  # noqa: E402
from sllm_faas.controller.simulator.engine import RunResult, run_policies, simulate  # noqa: E402
from sllm_faas.controller.simulator.report import (  # noqa: E402
    p99_ratio_interval,
    ratios,
    scenario_markdown,
    write_pareto,
    write_plots,
)
from sllm_faas.controller.simulator.workload import generate  # noqa: E402

AVAILABILITY_ONLY = ("random", "least-allocated")
KEEPALIVE_SCENARIO, FIXED_WINDOWS_S, EXCHANGE_RATES = "azure-conv", (10.0, 60.0, 600.0), (3.0, 10.0, 30.0, 100.0)
TARGETS = {"vs_availability_only_p99": (1.27, 1.95), "vs_release_p99_default": 1.2, "scale_wall_s": 60.0}


@contextlib.contextmanager
def timed_plans():
    """Seconds spent inside sllm_faas.controller.scheduler.plans and calls (the policies call it through the module)."""
    real, spent = scheduler.plans, [0.0, 0]

    def plans(snapshot, model_name):
        started = time.perf_counter()
        try:
            return real(snapshot, model_name)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    scheduler.plans = plans
    try:
        yield spent
    finally:
        scheduler.plans = real


def summary(result: RunResult) -> dict:
    return {"policy": result.policy, "rate": result.rate, "mean_s": result.mean, "p50_s": result.percentile(50),
            "p99_s": result.percentile(99), "gpu_hours": result.gpu_seconds / 3600,
            "cold_starts": dict(result.cold_starts), "warm_starts": result.warm_starts,
            "migrations": result.migrations, "unserved": result.unserved, "simulated_s": result.simulated_s,
            "wall_s": result.wall_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="default,paper-8gpu,paper-4x4,azure-conv")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1,000-node timing run")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-keepalive", action="store_true", help="skip the keep-alive comparison (Pareto plot)")
    parser.add_argument("--seeds", default="1,2",
                        help="more seeds: every policy at every sweep rate under each (comma-separated; '' for none)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]

    output = results_path("simulate", ".json")
    report = {"date": now_utc(), "machine": machine_info(RESULTS_DIR), "targets": TARGETS, "scenarios": {}}
    sections = []
    checked: list[tuple[str, int, list[RunResult]]] = []  # (scenario, seed, one rate's results) for the seeds table
    for name in filter(None, args.scenarios.split(",")):  # --scenarios "": the scale run only
        scenario = load_scenario(name)
        results = run_policies(scenario)
        sweep = [run_policies(scenario, rate) for rate in scenario.workload.sweep_rates]
        base = ratios(results)
        print(f"{name}: p99 over ours' p99 at {results[0].rate:g} req/s: "
              + ", ".join(f"{policy} {ratio:.2f}x" for policy, ratio in base.items()))
        for point in sweep:
            print(f"  at {point[0].rate:g} req/s: "
                  + ", ".join(f"{policy} {ratio:.2f}x" for policy, ratio in ratios(point).items()))
        sections.append(scenario_markdown(scenario, results, sweep))
        if not args.no_plots:
            write_plots(output.with_name(f"{output.stem}-{name}"), results, sweep)
        report["scenarios"][name] = {"base": [summary(r) for r in results], "ratios": base,
                                     "sweep": [{"rate": point[0].rate, "results": [summary(r) for r in point],
                                                "ratios": ratios(point)} for point in sweep]}
        checked += [(name, scenario.seed, point) for point in sweep]
        for seed in seeds:
            other = dataclasses.replace(scenario, seed=seed)
            checked += [(name, seed, run_policies(other, rate)) for rate in scenario.workload.sweep_rates]
    if checked:
        sections.append(seeds_section(report, checked))
    if not args.no_keepalive:
        sections.append(keepalive_section(output, report, not args.no_plots, seeds))
    if not args.no_scale:
        scenario = load_scenario("scale-1000")
        started = time.perf_counter()
        trace = generate(scenario)
        trace_s = time.perf_counter() - started
        results, in_rank = [], {}
        for policy in scenario.policies:
            with timed_plans() as spent:
                results.append(simulate(scenario, policy, trace))
            in_rank[policy] = {"seconds": spent[0], "calls": spent[1]}
            print(f"scale-1000 {policy}: {results[-1].wall_s:.1f} s for {len(trace)} requests on 1,000 nodes, "
                  f"{spent[0]:.1f} s of it in {spent[1]} scheduler.plans calls "
                  f"(target < {TARGETS['scale_wall_s']:.0f} s)")
        sections.append(scenario_markdown(scenario, results) + f"\nTrace generation: {trace_s:.2f} s. Inside "
                        "`sllm_faas.controller.scheduler.plans`: "
                        + ", ".join(f"{p} {t['seconds']:.1f} s ({t['calls']} calls)" for p, t in in_rank.items())
                        + ".\n")
        report["scenarios"]["scale-1000"] = {"base": [summary(r) for r in results], "trace_s": trace_s,
                                             "in_rank_s": in_rank}
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report, sections))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


def seeds_section(report: dict, checked: list[tuple[str, int, list[RunResult]]]) -> str:
    """The target over seeds: at every sweep rate of every scenario and every seed, each policy's p99 over ours'
    (below 1: ours has the longer tail there, a loss)."""
    policies = list(dict.fromkeys(r.policy for _, _, point in checked for r in point if r.policy != "ours"))
    lines = ["### Every sweep rate under every seed", "", "Each policy's p99 over ours' p99 (below 1: a loss of ours).",
             "", "| scenario | rate | seed | ours p99 s | " + " | ".join(policies) + " |",
             "|---|---|---|---|" + "---|" * len(policies)]
    losses = []
    for name, seed, point in checked:
        got = ratios(point)
        ours = next(r.percentile(99) for r in point if r.policy == "ours")
        lines.append(f"| {name} | {point[0].rate:g} | {seed} | {ours:.2f} | " + " | ".join(
            "-" if p not in got else f"{got[p]:.3f}" + (" **loss**" if got[p] < 1 else "") for p in policies) + " |")
        losses += [f"{name} {point[0].rate:g}/s seed {seed}: {p} {got[p]:.3f}x{_interval(point, p)}"
                   for p in got if got[p] < 1]
    compared = sum(len(ratios(point)) for _, _, point in checked)
    lines += ["", f"Losses: {len(losses)} of {compared} comparisons at {len(checked)} points"
              + (": " + "; ".join(losses) if losses else "") + "."
              + (" In brackets: the 95% interval of the ratio over resampled requests (`p99_ratio_interval`)."
                 if losses else "")]
    print(lines[-1])
    report["seeds"] = {"points": len(checked), "losses": losses}
    return "\n".join(lines) + "\n"


def _interval(point: list[RunResult], policy: str) -> str:
    """ " [low-high]": the 95% interval of `policy`'s p99 over ours' at this point (empty where there is none)."""
    ours, other = (next(r for r in point if r.policy == name) for name in ("ours", policy))
    interval = p99_ratio_interval(other, ours)
    return f" [{interval[0]:.2f}-{interval[1]:.2f}]" if interval else ""


def keepalive_section(output: Path, report: dict, plots: bool, seeds: list[int]) -> str:
    """`ours` on KEEPALIVE_SCENARIO at its base rate under fixed windows and the cost policy at several exchange
    rates, for the scenario's seed and `seeds`: p50, p99, GPU-hours, cold starts by tier, and the Pareto plot
    (GPU-hours against p99) of the scenario's seed."""
    base = load_scenario(KEEPALIVE_SCENARIO)
    lines = [f"### Keep-alive ({KEEPALIVE_SCENARIO}, ours, {base.workload.rate:g}/s)", "",
             "| seed | keep-alive | p50 s | p99 s | GPU-hours | cold starts dram / ssd / remote |",
             "|---|---|---|---|---|---|"]
    report["keepalive"] = {}
    for seed in [base.seed, *seeds]:
        scenario = dataclasses.replace(base, seed=seed)
        trace = generate(scenario)
        policies = [(f"fixed {w:g} s", FixedKeepAlive(w)) for w in FIXED_WINDOWS_S]
        policies += [(f"cost x{rate:g}", CostKeepAlive(scenario.keep_alive_s, rate)) for rate in EXCHANGE_RATES]
        points = [(label, simulate(scenario, "ours", trace, keepalive=policy)) for label, policy in policies]
        for label, result in points:
            cold = " / ".join(str(result.cold_starts.get(tier, 0)) for tier in ("dram", "ssd", "remote"))
            lines.append(f"| {seed} | {label} | {result.percentile(50):.2f} | {result.percentile(99):.2f} | "
                         f"{result.gpu_seconds / 3600:.1f} | {cold} |")
            print(f"keep-alive seed {seed} {label}: p99 {result.percentile(99):.2f} s, "
                  f"{result.gpu_seconds / 3600:.1f} GPU-hours")
        if plots and seed == base.seed:
            write_pareto(output.with_name(f"{output.stem}-keepalive-pareto.png"), points)
        report["keepalive"][str(seed)] = {label: summary(result) for label, result in points}
    return "\n".join(lines) + "\n"


def markdown(report: dict, sections: list[str]) -> str:
    machine = report["machine"]
    lines = [f"# Simulator results, {report['date']}", "",
             f"Machine: {machine['cpu_model']}, {machine['nproc']} CPUs, Python {machine['python']}. "
             "Simulated times to first token in seconds; `p99 / ours' p99` above 1 means ours has the shorter tail.",
             "", "## Targets", ""]
    scenarios = report["scenarios"]
    if "paper-4x4" in scenarios:
        low, high = TARGETS["vs_availability_only_p99"]
        cluster = scenarios["paper-4x4"]
        points = [(point["rate"], point["ratios"]) for point in cluster["sweep"]] or [
            (cluster["base"][0]["rate"], cluster["ratios"])]
        lines.append(f"- paper-4x4, availability-only p99 / ours (paper: {low}-{high}x):")
        for rate, got in points:
            lines.append(f"  - {rate:g} req/s: "
                         + ", ".join(f"{policy} {got[policy]:.2f}x" for policy in AVAILABILITY_ONLY if policy in got))
    if "default" in scenarios:
        got = scenarios["default"]["ratios"].get("sllm-release")
        lines.append(f"- default, sllm-release p99 / ours (target >= {TARGETS['vs_release_p99_default']}x): "
                     f"{got:.2f}x" if got else "- default: sllm-release not run")
    if "scale-1000" in scenarios:
        walls = ", ".join(f"{r['policy']} {r['wall_s']:.1f} s" for r in scenarios["scale-1000"]["base"])
        lines.append(f"- scale-1000, wall time per policy (target < {TARGETS['scale_wall_s']:.0f} s): {walls}")
    return "\n".join(lines + ["", "## Scenarios", ""] + sections)


if __name__ == "__main__":
    sys.exit(main())
