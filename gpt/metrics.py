"""The server's Prometheus metrics (gpt/serve.py's GET /metrics), kept by `prometheus-client` in a registry of the
app's own, so that two apps in one process (tests) count apart. Docs: docs/serve.md (Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match

# Seconds; from a few ms (a tiny model, an idle server) to minutes (a long answer on a busy CPU)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """What /metrics reports. `routes`: the app's routes, to label a request by its route's path template (one
    label for every model id of /v1/models/{model}; "other" for a path no route serves)."""

    def __init__(self, routes, running, waiting):
        self.routes = routes
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gpt_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "gpt_request_latency_seconds",
            "Seconds from a request's arrival to the last byte of its answer (a stream's whole length)",
            ["route"],
            buckets=BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gpt_time_to_first_token_seconds",
            "Seconds from a completion request's arrival to its first generated token",
            buckets=BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gpt_prompt_tokens", "Prompt tokens of the completion requests admitted", registry=r
        )
        self.completion_tokens = Counter("gpt_completion_tokens", "Tokens generated", registry=r)
        self.rejected = Counter("gpt_rejected", "Requests refused with 429: the waiting queue was full", registry=r)
        self.timeouts = Counter("gpt_timeouts", "Requests cancelled past request_timeout", registry=r)
        Gauge("gpt_running", "Rows (choices) in the running batch", registry=r).set_function(running)
        Gauge("gpt_waiting", "Choices waiting for a row", registry=r).set_function(waiting)

    def route(self, scope) -> str:
        route = scope.get("route")  # set by FastAPI's router once it has matched
        if route is None:  # answered before the router (Guard: API key, body size): match here
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", "other")

    def answered(self, scope, status, seconds: float) -> None:
        route = self.route(scope)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)
