"""Prometheus metrics of `enginesmith serve`, named `enginesmith:<what>_<unit>` (after vLLM).

One registry per server app. Gauges read the engine's scheduler when scraped; counters and
histograms are fed once per finished request from its RequestStats.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from enginesmith.runtime.engine_core import RequestOutput

# Seconds. TTFT and end-to-end buckets span a tiny engine's milliseconds to a long CPU answer;
# inter-token buckets a fast decode step to a stalled one.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class ServerMetrics:
    """The server's metrics over one LLM (its scheduler is read at scrape time)."""

    def __init__(self, llm: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        names = list(labels)
        scheduler = llm.core.scheduler
        kv = scheduler.kv

        def gauge(name: str, doc: str, read: Any) -> None:
            g = Gauge(name, doc, names, registry=self.registry)
            g.labels(**labels).set_function(read)

        gauge(
            "enginesmith:num_requests_running",
            "Requests holding a KV slot (prefilling or decoding).",
            lambda: len(scheduler.running),
        )
        gauge(
            "enginesmith:num_requests_waiting",
            "Requests queued for a KV slot.",
            lambda: len(scheduler.waiting),
        )
        gauge(
            "enginesmith:kv_slots_used",
            "KV-cache slots held by running requests.",
            lambda: kv.num_slots - kv.free_slots,
        )
        gauge("enginesmith:kv_slots_total", "KV-cache slots of the engine.", lambda: kv.num_slots)
        gauge(
            "enginesmith:kv_tokens_used",
            "Tokens reserved in the KV cache across slots.",
            lambda: kv.tokens_in_use,
        )
        if llm.spec_stats is not None:  # the engine speculates (a draft source is on)
            stats = llm.spec_stats
            gauge(
                "enginesmith:spec_decode_acceptance_rate",
                "Share of proposed draft tokens the target accepted, since the server started.",
                lambda: stats.acceptance_rate,
            )
            gauge(
                "enginesmith:spec_decode_draft_tokens",
                "Draft tokens proposed and verified, since the server started.",
                lambda: stats.draft_tokens,
            )
            gauge(
                "enginesmith:spec_decode_accepted_tokens",
                "Draft tokens the target accepted, since the server started.",
                lambda: stats.accepted_tokens,
            )
        self.prompt_tokens = Counter(
            "enginesmith:prompt_tokens", "Prompt tokens processed.", names, registry=self.registry
        ).labels(**labels)
        self.generation_tokens = Counter(
            "enginesmith:generation_tokens", "Tokens generated.", names, registry=self.registry
        ).labels(**labels)
        self._finished = Counter(
            "enginesmith:request_success",
            "Requests finished, by finish reason (cancelled: the client went away).",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        self._labels = labels
        self.ttft = Histogram(
            "enginesmith:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            names,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.itl = Histogram(
            "enginesmith:inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            names,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.e2e = Histogram(
            "enginesmith:e2e_request_latency_seconds",
            "Time from arrival to the last generated token.",
            names,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._http = Counter(
            "enginesmith:http_requests",
            "HTTP requests answered, by route and status code.",
            [*names, "route", "status"],
            registry=self.registry,
        )

    def observe_request(self, output: RequestOutput) -> None:
        """Record one finished (or cancelled) request."""
        stats = output.stats
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(len(output.token_ids))
        self._finished.labels(**self._labels, finished_reason=output.finish_reason).inc()
        times = stats.token_times
        if not times:
            return
        self.ttft.observe(stats.time_to_first_token_s)
        for earlier, later in zip(times, times[1:], strict=False):
            self.itl.observe(later - earlier)
        self.e2e.observe(times[-1] - stats.arrival_time)

    def observe_http(self, route: str, status: int) -> None:
        self._http.labels(**self._labels, route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
