"""Render deploy/grafana/sllm-faas.json's panels to a PNG from scrapes of live /metrics endpoints.

    python deploy/grafana/render.py --state WORKDIR/cluster.json --out deploy/grafana/sllm-faas.png

Without Grafana and Prometheus at hand, this evaluates each panel's query over one scrape of every service of a
running `sllm-faas up` (the gateway, controller and loaders from its state file, and the instances the gateway
lists), so a histogram quantile covers every observation since the services started rather than a rate
window. It understands the two query shapes the dashboard uses and refuses any other, so a panel it cannot
draw is never drawn wrong:

    histogram_quantile(Q, sum by (le, LABEL) (rate(METRIC_bucket{SELECTOR}[WINDOW])))
    sum by (LABEL) (METRIC)
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

QUANTILE = re.compile(r"histogram_quantile\(([\d.]+), sum by \(le, (\w+)\) \(rate\(([\w:]+)_bucket\{(.*)\}\[.*\]\)\)\)")
SUM = re.compile(r"sum by \((\w+)\) \(([\w:]+)\)")
SELECTOR = re.compile(r'(\w+)="([^"]*)"')


def scrape(urls: list[str]) -> list:
    """Every sample of every endpoint's /metrics (an http URL, or a loader's Unix socket path)."""
    from sllm_faas.runtime.node_loader.client import _UnixConnection

    samples = []
    for url in urls:
        if url.startswith("http"):
            text = requests.get(url + "/metrics", timeout=10).text
        else:
            connection = _UnixConnection(url, 10)
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        samples += [s for family in text_string_to_metric_families(text) for s in family.samples]
    return samples


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def evaluate(expr: str, legend: str, samples: list) -> dict[str, float]:
    """{legend: value} of one target's query over the scraped samples."""
    if match := QUANTILE.fullmatch(expr):
        q, by, metric, selector = float(match[1]), match[2], match[3], dict(SELECTOR.findall(match[4]))
        grouped: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s in samples:
            if s.name == metric + "_bucket" and selector.items() <= s.labels.items():
                grouped[s.labels.get(by, "")][float(s.labels["le"])] += s.value
        return {legend.replace("{{" + by + "}}", key): quantile(q, buckets) for key, buckets in grouped.items()}
    if match := SUM.fullmatch(expr):
        by, metric = match[1], match[2]
        sums: dict[str, float] = defaultdict(float)
        for s in samples:
            if s.name == metric:
                sums[s.labels.get(by, "")] += s.value
        return {legend.replace("{{" + by + "}}", key): value for key, value in sums.items()}
    raise SystemExit(f"render.py cannot evaluate {expr!r}: only the two shapes in its docstring")


def endpoints(state: dict) -> list[str]:
    """The gateway, controller, loaders (their sockets) and running instances of a `sllm-faas up` (its state
    file); the admin token lists the instances."""
    token = Path(state["token_file"]).read_text().strip()
    urls = [state["gateway"], state["controller"], *state["nodes"].values()]
    functions = requests.get(state["gateway"] + "/system/functions", headers={"Authorization": f"Bearer {token}"},
                             timeout=10).json()
    for function in functions:
        detail = requests.get(f"{state['gateway']}/system/function/{function['name']}",
                              headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        urls += [instance["url"] for instance in detail["instances"]]
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True, help="the state file of a running `sllm-faas up`")
    parser.add_argument("--dashboard", type=Path, default=Path(__file__).with_name("sllm-faas.json"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sllm-faas.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    urls = endpoints(json.loads(args.state.read_text()))
    samples = scrape(urls)
    panels = json.loads(args.dashboard.read_text())["panels"]
    columns = 2
    figure, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(14, 3.4 * len(panels) / columns))
    for axis, panel in zip(axes.flat, panels, strict=False):
        values: dict[str, float] = {}
        for target in panel["targets"]:
            values |= evaluate(target["expr"], target["legendFormat"], samples)
        names = sorted(values)
        axis.barh(names, [values[n] for n in names], color="#3274d9")
        for y, name in enumerate(names):
            axis.text(values[name], y, f" {values[name]:.3g}", va="center", fontsize=8)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("seconds" if unit == "s" else "requests", fontsize=8)
        axis.tick_params(labelsize=8)
    figure.suptitle(f"{json.loads(args.dashboard.read_text())['title']}: one scrape of a live `sllm-faas up` "
                    f"({len(urls)} endpoints; quantiles over every observation since start)", fontsize=11)
    figure.tight_layout()
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out} from {len(samples)} samples of {len(urls)} endpoints")


if __name__ == "__main__":
    main()
