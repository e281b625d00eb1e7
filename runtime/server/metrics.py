"""A small Prometheus registry (text format 0.0.4); names mirror vLLM's where they exist."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
COLD_START_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, tuple[tuple[float, ...], dict[tuple, list]]] = {}
        self._gauges_fn: dict[str, callable] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._values.setdefault(name, {})

    def gauge(self, name: str, help_text: str, read=None) -> None:
        self._help[name] = ("gauge", help_text)
        self._values.setdefault(name, {})
        if read is not None:
            self._gauges_fn[name] = read

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help_text)
        self._histograms[name] = (buckets, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets, series = self._histograms[name]
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = series.setdefault(key, [0] * (len(buckets) + 1) + [0.0])
            counts[bisect.bisect_left(buckets, value)] += 1
            counts[-1] += value

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self._help.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if name in self._gauges_fn:
                    lines.append(f"{name} {float(self._gauges_fn[name]())}")
                elif kind == "histogram":
                    buckets, series = self._histograms[name]
                    for key, counts in series.items():
                        labels, cumulative = dict(key), 0
                        for bound, count in zip((*buckets, float("inf")), counts[:-1], strict=True):
                            cumulative += count
                            le = "+Inf" if bound == float("inf") else repr(bound)
                            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
                        lines.append(f"{name}_sum{_labels(labels)} {counts[-1]}")
                        lines.append(f"{name}_count{_labels(labels)} {cumulative}")
                else:
                    for key, value in self._values[name].items():
                        lines.append(f"{name}{_labels(dict(key))} {value}")
        return "\n".join(lines) + "\n"
