"""Prometheus metrics of the serving process (names follow Prometheus' conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("duet_http_requests_total", "HTTP requests by route and status", ["route", "status"])
REDIS_ERRORS = Counter("duet_redis_errors_total", "Redis calls that failed or timed out (serving then answers "
                       "single answers only for a few seconds)")
LATENCY = Histogram(
    "duet_http_request_duration_seconds", "Time to the full response (streams: to the last byte)", ["route"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
)
TTFT = Histogram(
    "duet_time_to_first_token_seconds", "Time from request to the first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
GENERATED_TOKENS = Counter("duet_generated_tokens_total", "Completion tokens generated")
PROMPT_TOKENS = Counter("duet_prompt_tokens_total", "Prompt tokens processed")
PAIRED_RESPONSES = Counter("duet_paired_responses_total", "Responses that carried K answers to compare", ["k"])
INFLIGHT = Gauge("duet_inflight_requests", "Chat requests being answered now")
ENGINE_QUEUE = Gauge("duet_engine_unfinished_requests", "Requests the engine holds (waiting or running)")
ABORTS = Counter("duet_engine_aborts_total", "Generations aborted because the client went away")
MODEL_VERSION = Gauge("duet_model_version_info", "The model version being served (value 1)", ["version"])


def set_model_version(version: str) -> None:
    MODEL_VERSION.clear()
    MODEL_VERSION.labels(version=version).set(1)
VOTES = Counter("duet_votes_total", "Votes accepted, by choice (a, b, tie, both_bad, ranking, up, down, edit)", ["choice"])
VOTE_REJECTIONS = Counter("duet_vote_rejections_total", "Votes refused, by reason", ["reason"])
