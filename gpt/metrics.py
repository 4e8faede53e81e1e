"""The server's Prometheus metrics (gpt/serve.py's GET /metrics), kept by `prometheus-client` in a registry of the
app's own, so that two apps in one process (tests) count apart. The prefix cache's (gpt/prefixcache.py) are read
from its own counters when scraped. Docs: docs/serve.md (Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match

# Seconds; from a few ms (a tiny model, an idle server) to minutes (a long answer on a busy CPU)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """What /metrics reports. `routes`: the app's routes, to label a request by its route's path template (one
    label for every model id of /v1/models/{model}; "other" for a path no route serves)."""

    def __init__(self, routes, running, waiting, prefix_cache=None):
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
        r.register(PrefixCacheCollector(prefix_cache))

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


class PrefixCacheCollector:
    """The prefix cache's counts, as the engine's thread keeps them (PrefixCache.reused, .stored, .tokens), read
    at each scrape; all 0 when the server runs without one (prefix_cache_tokens=0: its capacity reads 0 too)."""

    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        c, on = self.cache, self.cache is not None
        yield CounterMetricFamily(
            "gpt_prefix_cache_hit_tokens",
            "Prompt tokens read from the prefix cache, not computed (a prompt read once for n choices counts once)",
            value=c.reused if on else 0,
        )
        yield CounterMetricFamily(
            "gpt_prefix_cache_stored_tokens",
            "Tokens whose keys and values were put in the prefix cache",
            value=c.stored if on else 0,
        )
        yield GaugeMetricFamily(
            "gpt_prefix_cache_tokens",
            "Tokens whose keys and values the prefix cache holds now",
            value=c.tokens if on else 0,
        )
        yield GaugeMetricFamily(
            "gpt_prefix_cache_capacity_tokens",
            "The most tokens the prefix cache holds (prefix_cache_tokens, in whole blocks; 0: off)",
            value=c.blocks_max * c.block if on else 0,
        )
