"""GET /metrics: the engine's stats and the server's response counts in Prometheus' text format (0.0.4)."""

from __future__ import annotations

from collections.abc import Mapping

from ..inference.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(stats: EngineStats, responses: Mapping[int, int]) -> str:
    """Prometheus exposition text; `responses` counts HTTP answers by status code."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    s = stats
    metric("dsv3_requests_total", "counter", "Generation requests accepted.", [("", s.requests_total)])
    metric(
        "dsv3_requests_rejected_total",
        "counter",
        "Requests refused because the queue was full (429).",
        [("", s.requests_rejected)],
    )
    metric(
        "dsv3_requests_finished_total",
        "counter",
        "Finished requests by reason.",
        [(f'{{reason="{k}"}}', v) for k, v in sorted(s.requests_finished.items())],
    )
    metric("dsv3_requests_active", "gauge", "Requests holding a cache slot.", [("", s.requests_active)])
    metric("dsv3_queue_depth", "gauge", "Requests waiting for a cache slot.", [("", s.requests_queued)])
    metric("dsv3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    metric("dsv3_generated_tokens_total", "counter", "Tokens generated.", [("", s.tokens_generated)])
    metric(
        "dsv3_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second over the last 10 s.",
        [("", s.tokens_per_second)],
    )
    metric("dsv3_batch_size", "gauge", "Rows in the latest decode step.", [("", s.batch_size)])
    metric("dsv3_batch_size_max", "gauge", "Most rows seen in one decode step.", [("", s.max_batch_size)])
    metric("dsv3_cache_slots_in_use", "gauge", "Latent-cache sequence slots in use.", [("", s.cache_slots_in_use)])
    metric("dsv3_cache_slots", "gauge", "Latent-cache sequence slots in all.", [("", s.cache_slots)])
    metric(
        "dsv3_prefix_tokens_reused_total",
        "counter",
        "Prompt tokens not prefilled because a cached prefix held them.",
        [("", s.prefix_tokens_reused)],
    )
    metric("dsv3_cached_prefixes", "gauge", "Idle cache slots holding a sequence for reuse.", [("", s.cached_prefixes)])
    metric(
        "dsv3_http_responses_total",
        "counter",
        "HTTP responses by status code.",
        [(f'{{code="{code}"}}', n) for code, n in sorted(responses.items())],
    )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
