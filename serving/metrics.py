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
ANNOUNCEMENTS_REFUSED = Counter("duet_weights_announcements_refused_total",
                                "Announcements on the weights topic that were not a well-formed registry version")
ANNOUNCEMENTS_HELD = Counter("duet_weights_announcements_held_total",
                             "Announcements not followed because updates are paused (POST /admin/updates/pause)")
ABORTS = Counter("duet_engine_aborts_total", "Generations aborted because the client went away")
MODEL_VERSION = Gauge("duet_model_version_info", "The model version being served (value 1)", ["version"])


def set_model_version(version: str) -> None:
    MODEL_VERSION.clear()
    MODEL_VERSION.labels(version=version).set(1)
VOTES = Counter("duet_votes_total", "Votes accepted, by choice (a, b, tie, both_bad, ranking, up, down, edit)", ["choice"])
VOTE_REJECTIONS = Counter("duet_vote_rejections_total", "Votes refused, by reason", ["reason"])

# --- canary tests (serving/canary.py) ---------------------------------------------------------------
CANARY_RUNNING = Gauge("duet_canary_running", "1 while a canary test of a candidate version is running")
CANARY_CANDIDATE_LOADED = Gauge("duet_canary_candidate_loaded",
                                "1 if this replica holds the candidate under test (else it serves the incumbent alone)")
CANARY_LOAD_FAILURES = Counter("duet_canary_load_failures_total", "Candidates this replica could not load")
CANARY_VOTES = Counter("duet_canary_votes_total", "Cross-version votes counted, by the candidate's outcome",
                       ["outcome"])
CANARY_TEST_VOTES = Gauge("duet_canary_test_votes", "Cross-version votes in the current test")
CANARY_WIN_RATE = Gauge("duet_canary_win_rate", "The candidate's win rate against the incumbent (ties 1/2)")
CANARY_BOUND = Gauge("duet_canary_win_rate_bound", "The anytime-valid confidence sequence's bounds", ["side"])
CANARY_AGE = Gauge("duet_canary_age_seconds", "How long the running test has run (0: none running)")
CANARY_BUDGET = Gauge("duet_canary_budget_seconds", "A test's time budget (DUET_CANARY_MAX_HOURS)")
CANARY_DECISIONS = Counter("duet_canary_decisions_total", "Tests decided by this replica", ["decision", "reason"])
