"""Results as a markdown table (what gets committed and read) and, when matplotlib is installed, plots:
time-to-first-token CDFs per policy and tail latency against request rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sllm_faas.controller.simulator.config import Scenario
from sllm_faas.controller.simulator.engine import RunResult

TIERS = ("dram", "ssd", "remote")
REFERENCE = "ours"


def scenario_markdown(scenario: Scenario, results: list[RunResult], sweep: list[list[RunResult]] = ()) -> str:
    """One section: the scenario, a row per policy at its base rate, then p99 per rate if swept."""
    workload = scenario.workload
    gpus = sum(group.count * group.gpus for group in scenario.node_groups)
    nodes = sum(group.count for group in scenario.node_groups)
    lines = [f"### {scenario.name}", "", f"{scenario.description}", "",
             f"{nodes} nodes, {gpus} GPUs ({scenario.gpu.name}), {len(scenario.models)} functions; "
             f"{len(results[0].ttft_s) + results[0].unserved} requests at {results[0].rate:g}/s ({workload.arrival}"
             f"{f', cv {workload.cv:g}' if workload.arrival == 'gamma' else ''}, Zipf {workload.zipf_s:g}), "
             f"seed {scenario.seed}. Times to first token in seconds.", "",
             "| policy | mean | p50 | p99 | p99 / ours' p99 | GPU-hours | cold starts dram / ssd / remote | warm | "
             "migrations | unserved | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    reference = _reference_p99(results)
    for result in results:
        lines.append(f"| {result.policy} | {result.mean:.2f} | {_cells(result, reference)} | "
                     f"{result.warm_starts} | {result.migrations} | {result.unserved} | {result.wall_s:.2f} |")
    if sweep:
        lines += ["", "By request rate (same seed): p50 and p99 time to first token (s), GPU-hours, cold starts:",
                  "", "| rate (req/s) | policy | p50 | p99 | p99 / ours' p99 | GPU-hours | "
                  "cold starts dram / ssd / remote | migrations |", "|---|---|---|---|---|---|---|---|"]
        for point in sweep:
            reference = _reference_p99(point)
            lines += [f"| {r.rate:g} | {r.policy} | {_cells(r, reference)} | {r.migrations} |" for r in point]
    return "\n".join(lines) + "\n"


def _cells(result: RunResult, reference: float | None) -> str:
    """p50 | p99 | p99 over ours' | GPU-hours | cold starts by tier, as table cells."""
    ratio = f"{result.percentile(99) / reference:.2f}x" if reference else "-"
    cold = " / ".join(str(result.cold_starts.get(tier, 0)) for tier in TIERS)
    return (f"{result.percentile(50):.2f} | {result.percentile(99):.2f} | {ratio} | "
            f"{result.gpu_seconds / 3600:.1f} | {cold}")


def ratios(results: list[RunResult]) -> dict[str, float]:
    """Each policy's p99 over ours: how many times longer its tail is."""
    reference = _reference_p99(results)
    return {r.policy: r.percentile(99) / reference for r in results if reference and r.policy != REFERENCE}


def p99_ratio_interval(result: RunResult, reference: RunResult, rounds: int = 1000, seed: int = 0
                       ) -> tuple[float, float] | None:
    """The 95% interval of `result`'s p99 over `reference`'s when the requests are resampled (paired: both
    served the same requests, each drawn with its two times to first token). A p99 of 2,000 requests rests on
    its 20 longest: the interval says how much of a ratio those few decide. It does not re-simulate, so the
    divergence of two policies' runs after one different decision is not in it. None where the two served
    different requests, or none."""
    times, reference_times = result.ttft_s, reference.ttft_s
    if result.unserved or reference.unserved or len(times) != len(reference_times) or not len(times):
        return None
    picks = np.random.default_rng(seed).integers(0, len(times), size=(rounds, len(times)))
    resampled = np.percentile(times[picks], 99, axis=1) / np.percentile(reference_times[picks], 99, axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(low), float(high)


def _reference_p99(results: list[RunResult]) -> float | None:
    return next((r.percentile(99) for r in results if r.policy == REFERENCE), None)


def write_plots(prefix: Path, results: list[RunResult], sweep: list[list[RunResult]] = ()) -> list[Path]:
    """PREFIX-cdf.png and, with a sweep, PREFIX-rate.png. Without matplotlib: a note, and no plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'sllm-faas[sim]'): no plots, the table is written")
        return []
    written = []
    figure, axes = plt.subplots(figsize=(6, 4), dpi=80)
    for result in results:
        values = np.sort(result.ttft_s)
        axes.plot(values, np.arange(1, len(values) + 1) / len(values), label=result.policy)
    axes.set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of requests",
             title=f"{prefix.name}: TTFT CDF at {results[0].rate:g} req/s")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    written.append(_save(figure, prefix.with_name(prefix.name + "-cdf.png")))
    if sweep:
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
        for index, policy in enumerate(r.policy for r in sweep[0]):
            rates = [point[index].rate for point in sweep]
            axes[0].plot(rates, [point[index].percentile(99) for point in sweep], marker="o", label=policy)
            axes[1].plot(rates, [point[index].mean for point in sweep], marker="o", label=policy)
        for axis, what in zip(axes, ("p99", "mean"), strict=True):
            axis.set(xlabel="request rate (req/s)", ylabel=f"{what} TTFT (s)", yscale="log", title=f"{what} TTFT")
            axis.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        figure.suptitle(prefix.name)
        written.append(_save(figure, prefix.with_name(prefix.name + "-rate.png")))
    plt.close("all")
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_pareto(path: Path, points: list[tuple[str, RunResult]]) -> Path | None:
    """GPU-hours against p99 time to first token, one labelled point per keep-alive policy (lower left is better):
    the cost policy's exchange rates trace a curve the fixed windows can be read against."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'sllm-faas[sim]'): no Pareto plot")
        return None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=80)
    for kind, marker in (("fixed", "s"), ("cost", "o")):
        chosen = [(label, result) for label, result in points if label.startswith(kind)]
        axes.plot([r.gpu_seconds / 3600 for _, r in chosen], [r.percentile(99) for _, r in chosen], marker=marker,
                  label=kind)
        for label, result in chosen:
            axes.annotate(label, (result.gpu_seconds / 3600, result.percentile(99)), fontsize=7)
    axes.set(xlabel="GPU-hours", ylabel="p99 TTFT (s)", title=f"{path.stem}: keep-alive")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    saved = _save(figure, path)
    plt.close("all")
    return saved
