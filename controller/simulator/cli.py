"""`sllm-faas simulate SCENARIO`: replay a scenario's trace under each policy, print and write the table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sllm_faas.controller.simulator.config import POLICY_NAMES, ScenarioError, load_scenario, scenario_names


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {', '.join(unknown) or '(none)'} "
                                         f"(known: {', '.join(POLICY_NAMES)})")
    return names


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("scenario", help=f"a scenario TOML file or a built-in name ({', '.join(scenario_names())})")
    parser.add_argument("--policies", type=_policies, help="comma list (default: the scenario's); "
                                                            f"known: {', '.join(POLICY_NAMES)}")
    parser.add_argument("--rate", type=_positive(float), help="requests per second (default: the scenario's)")
    parser.add_argument("--requests", type=_positive(int), help="trace length (default: the scenario's)")
    parser.add_argument("--seed", type=int, help="trace and node seed (default: the scenario's)")
    parser.add_argument("--sweep", action="store_true", help="also run every rate in the scenario's sweep_rates")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="where simulate-SCENARIO.md and the plots go (default: benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true", help="write the table only")


def run(args: argparse.Namespace) -> int:
    from sllm_faas.controller.simulator.engine import run_policies
    from sllm_faas.controller.simulator.report import scenario_markdown, write_plots

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}")
        return 2
    workload = dataclasses.replace(scenario.workload, requests=args.requests or scenario.workload.requests)
    scenario = dataclasses.replace(scenario, workload=workload, policies=args.policies or scenario.policies,
                                   seed=scenario.seed if args.seed is None else args.seed)
    results = run_policies(scenario, args.rate)
    sweep = [run_policies(scenario, rate) for rate in scenario.workload.sweep_rates] if args.sweep else []
    text = scenario_markdown(scenario, results, sweep)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"simulate-{scenario.name}"
    table = prefix.with_name(prefix.name + ".md")
    table.write_text(text)
    written = [table] + ([] if args.no_plots else write_plots(prefix, results, sweep))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
