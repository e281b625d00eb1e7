"""Prometheus metrics of every service (runtime, controller, node loader, gateway), through prometheus_client.

Each service builds one `Metrics` and declares its counters, gauges and histograms on it. Our launcher
(`sllm_faas.common.http_server.run`) gives every server start a fresh private PROMETHEUS_MULTIPROC_DIR, so the values
live in prometheus_client's multiprocess files: a scrape answered by any gunicorn worker sums all of them
(the controller runs 2), and counters keep the counts of a worker that died (never going down). Without that
variable (an app built in-process, as in tests) the values live in this process only.

Gauges whose value is read from the service's state rather than set as things happen are set by callbacks
given to `on_scrape`, which `render()` runs just before collecting; in multiprocess mode a gauge shows the
most recent value set by a live worker (`livemostrecent`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

disable_created_metrics()  # as vLLM: no `_created` series beside every counter and histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that dashboards and SLO rules written for vLLM read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
# sllm_cold_start_seconds: the phases of a cold start, from tens of milliseconds (a decision) to minutes (staging)
COLD_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
                      60.0, 120.0, 300.0, 600.0)
COLD_START = ("sllm_cold_start_seconds", "Seconds of one cold-start phase (`phase`), by model and by the tier the "
              "weights came from or went to (`tier`); each service observes the phases it measures (README).")
COLD_START_LABELS = ("phase", "model_name", "tier")


def token_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value (token-count histograms)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """One service's metrics and the registry `/metrics` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._multiprocess = multiprocess()
        if self._multiprocess:
            MultiProcessCollector(self.registry)
        self._on_scrape: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def _own(self) -> CollectorRegistry | None:
        """Where metric objects register: nowhere in multiprocess mode (the collector reads their files)."""
        return None if self._multiprocess else self.registry

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, documentation, labels, registry=self._own)

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...],
                  labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, documentation, labels, registry=self._own, buckets=buckets)

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self._own, multiprocess_mode="livemostrecent")

    def on_scrape(self, update: Callable[[], None]) -> None:
        """Run `update` (which sets gauges from the service's state) before each scrape is collected."""
        self._on_scrape.append(update)

    def cold_start(self) -> Histogram:
        """sllm_cold_start_seconds{phase, model_name, tier}: one histogram that every service observes into."""
        return self.histogram(*COLD_START, COLD_START_BUCKETS, COLD_START_LABELS)

    def render(self) -> bytes:
        with self._lock:
            for update in self._on_scrape:
                update()
            return generate_latest(self.registry)


class RuntimeMetrics:
    """The function runtime's metrics: vLLM's engine metrics (same names, `model_name` label, buckets) and
    the cold-start phases this process measures (runtime/server/startup.py's breakdown)."""

    PHASES = ("imports", "staging_wait", "load", "build", "warming", "process_start_to_ready")

    def __init__(self, metrics: Metrics, max_model_len: int, loaded: Callable[[], object]) -> None:
        m, name = metrics, ("model_name",)
        self.ttft = m.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                TTFT_BUCKETS, name)
        self.inter_token = m.histogram("vllm:inter_token_latency_seconds",
                                       "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS, name)
        self.e2e = m.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                               REQUEST_LATENCY_BUCKETS, name)
        self.queue = m.histogram("vllm:request_queue_time_seconds",
                                 "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS, name)
        self.prefill = m.histogram("vllm:request_prefill_time_seconds",
                                   "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS,
                                   name)
        self.decode = m.histogram("vllm:request_decode_time_seconds",
                                  "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS, name)
        tokens = token_buckets(max_model_len)
        self.prompt_tokens = m.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                         tokens, name)
        self.generation_tokens = m.histogram("vllm:request_generation_tokens",
                                             "Number of generation tokens processed.", tokens, name)
        self.prompt_total = m.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", name)
        self.generation_total = m.counter("vllm:generation_tokens", "Number of generation tokens processed.", name)
        self.preemptions = m.counter("vllm:num_preemptions", "Cumulative number of preemption from the engine "
                                     "(always 0 here: a request keeps its KV slot from admission to its end).", name)
        self.success = m.counter("vllm:request_success", "Count of finished requests, by finish reason (stop, "
                                 "length, cancelled, error).", (*name, "finished_reason"))
        running = m.gauge("vllm:num_requests_running", "Number of requests in model execution batches.", name)
        waiting = m.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", name)
        usage = m.gauge("vllm:kv_cache_usage_perc", "KV-cache usage (KV slots taken / slots). 1 means 100 percent "
                        "usage.", name)
        self.cold_start_seconds = m.cold_start()

        def update() -> None:
            current = loaded()
            if current is not None:
                engine = current.engine
                running.labels(current.name).set(engine.running)
                waiting.labels(current.name).set(engine.waiting)
                usage.labels(current.name).set(engine.running / engine.max_batch)

        m.on_scrape(update)

    def cold_start(self, model_name: str, report) -> None:
        """The breakdown of this process's cold start, one observation per phase, by the tier it loaded from."""
        self.preemptions.labels(model_name)  # the series exists (at 0) from the start, as vLLM's
        for phase in self.PHASES:
            self.cold_start_seconds.labels(phase, model_name, report.tier).observe(getattr(report, f"{phase}_s"))

    def finished(self, model_name: str, generation) -> None:
        """A finished request (runtime/model/engine.py's Generation, monotonic timestamps)."""
        self.success.labels(model_name, generation.finish_reason).inc()
        self.e2e.labels(model_name).observe(generation.finished_at - generation.submitted_at)
        self.prompt_tokens.labels(model_name).observe(len(generation.prompt_ids))
        self.generation_tokens.labels(model_name).observe(len(generation.output_ids))
        self.prompt_total.labels(model_name).inc(len(generation.prompt_ids))
        self.generation_total.labels(model_name).inc(len(generation.output_ids))
        if generation.scheduled_at is not None:
            self.queue.labels(model_name).observe(generation.scheduled_at - generation.submitted_at)
        if generation.first_token_at is None:
            return
        self.ttft.labels(model_name).observe(generation.first_token_at - generation.submitted_at)
        if generation.scheduled_at is not None:
            self.prefill.labels(model_name).observe(generation.first_token_at - generation.scheduled_at)
        self.decode.labels(model_name).observe(generation.finished_at - generation.first_token_at)
        times = generation.token_times
        for earlier, later in zip(times, times[1:], strict=False):
            self.inter_token.labels(model_name).observe(later - earlier)


def operator_routes(metrics: Metrics, dead_parts: Callable[[], list[str]] = list) -> Blueprint:
    """GET /healthz and /metrics as the controller, node loader and gateway serve them to kubelet and Prometheus:
    /healthz is 503 naming each part of the service that `dead_parts` reports stopped."""
    routes = Blueprint("operator", __name__)

    @routes.get("/healthz")
    def healthz():
        dead = dead_parts()
        if dead:
            return {"status": "unhealthy", "error": f"background loop(s) not running: {', '.join(dead)}"}, 503
        return {"status": "ok"}

    @routes.get("/metrics")
    def scrape():
        return Response(metrics.render(), content_type=CONTENT_TYPE)

    return routes
