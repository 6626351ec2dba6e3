"""The server's Prometheus metrics (``GET /metrics``, text format): requests by outcome, queue
depth, batch size, prefill and decode tokens/s, time to first token and per-token latency."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pysparse.serving.engine import Observer, Sequence

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_WINDOW_S = 10.0  # tokens/s gauges: over the last this many seconds


class _Rate:
    """Tokens per second over a sliding window of busy time."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int, float]] = deque()

    def add(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self.events.append((now, tokens, seconds))
        while self.events and self.events[0][0] < now - _WINDOW_S:
            self.events.popleft()

    def value(self) -> float:
        now = time.monotonic()
        # (a copy first: the engine's thread appends while the HTTP thread reads)
        recent = [(n, s) for t, n, s in list(self.events) if t >= now - _WINDOW_S]
        busy = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / busy if busy else 0.0


class Metrics(Observer):
    """The engine's observer, exported in Prometheus' text format by ``render``."""

    def __init__(self, engine_state: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pysparse_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pysparse_prompt_tokens", "Prompt tokens prefilled", registry=r
        )
        self.generated_tokens = Counter(
            "pysparse_generation_tokens", "Tokens generated", registry=r
        )
        self.queue = Gauge("pysparse_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("pysparse_running", "Sequences being decoded", registry=r)
        self.batch = Histogram(
            "pysparse_decode_batch_size",
            "Sequences per decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.prefill_rate = Gauge(
            "pysparse_prefill_tokens_per_second",
            f"Prefill tokens/s over the last {_WINDOW_S:.0f} s of prefill",
            registry=r,
        )
        self.decode_rate = Gauge(
            "pysparse_decode_tokens_per_second",
            f"Decode tokens/s (all sequences) over the last {_WINDOW_S:.0f} s of decoding",
            registry=r,
        )
        self.ttft = Histogram(
            "pysparse_time_to_first_token_seconds",
            "From request to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "pysparse_time_per_output_token_seconds",
            "Between a request's consecutive tokens",
            buckets=_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "pysparse_request_duration_seconds",
            "From request to its last token",
            buckets=_LATENCY,
            registry=r,
        )
        self._prefill, self._decode = _Rate(), _Rate()
        self.engine_state = engine_state  # callable -> (queue depth, running), read at render

    # Observer
    def prefill(self, tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(tokens)
        self._prefill.add(tokens, seconds)

    def decode(self, batch: int, seconds: float) -> None:
        self.batch.observe(batch)
        self._decode.add(batch, seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, seq: Sequence) -> None:
        self.generated_tokens.inc(len(seq.tokens))
        if seq.finished_s is not None:
            self.e2e.observe(seq.finished_s - seq.submitted_s)

    def render(self) -> bytes:
        if self.engine_state is not None:
            queued, running = self.engine_state()
            self.queue.set(queued)
            self.running.set(running)
        self.prefill_rate.set(self._prefill.value())
        self.decode_rate.set(self._decode.value())
        return generate_latest(self.registry)
