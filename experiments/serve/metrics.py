"""Prometheus metrics of one server (its own registry: no global state): requests by route and status,
tokens in and out, queue depth and slots in use (read from the engine when scraped), time to first
token, inter-token latency and end-to-end latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/rewards", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics", "/")
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("plutao_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens_in = Counter("plutao_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.tokens_generated = Counter("plutao_generated_tokens", "tokens generated", registry=r)
        Gauge("plutao_queue_depth", "requests waiting for a slot", registry=r).set_function(engine.queue_depth)
        Gauge("plutao_slots_in_use", "decoding slots holding a request", registry=r).set_function(engine.slots_in_use)
        self.ttft = Histogram("plutao_time_to_first_token_seconds", "from admission to the first token", buckets=LATENCY,
                              registry=r)
        self.itl = Histogram("plutao_inter_token_latency_seconds", "between a reply's tokens", buckets=LATENCY, registry=r)
        self.e2e = Histogram("plutao_request_latency_seconds", "a generation request from admission to its last token",
                             buckets=LATENCY, registry=r)

    def request(self, route: str, status: int) -> None:
        route = route if route in ROUTES else "other"  # (a scan of unknown paths cannot grow the metric)
        self.requests.labels(route, str(status)).inc()

    def latency(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def prompt_tokens(self, n: int) -> None:
        self.tokens_in.inc(n)

    def tokens_out(self, n: int) -> None:
        self.tokens_generated.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def between_tokens(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
