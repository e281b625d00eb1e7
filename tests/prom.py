"""Reading a /metrics answer the way Prometheus does (prometheus_client's parser), for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def families(text: str) -> dict:
    """Metric families by name (counters without their `_total`, as the parser names them)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels: str) -> float:
    """The sum of `sample`'s values over the series whose labels include `labels` (0 when there is none)."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())
