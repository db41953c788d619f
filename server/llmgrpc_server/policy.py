"""Request-path policy that needs no engine: defaults and stream coalescing.

Pure functions and constants, importable and unit-tested without vLLM; the
engine adapter (vllm_adapter/) applies them.
"""

from __future__ import annotations

# max_tokens when a request leaves it unset (capped by the room left in the
# context and by --max-tokens-limit).
DEFAULT_MAX_TOKENS = 16
# Prompts up to this many characters are tokenized on the event loop: a
# thread hop would cost more than they do.
INLINE_TOKENIZE_CHARS = 16_384
INLINE_DETOKENIZE_IDS = 4_096
# A large Tokenize answer's offsets (a message each: Python work per token) are
# added on the event loop this many at a time, other calls answered in
# between (under a millisecond a slice here): in a thread they would hold the
# GIL from the loop in 5 ms turns, several per health check
# (docs/reliability.md, "Limits").
TOKENS_PER_LOOP_TURN = 1_024
# Under load, one message per token costs the front end and its clients more CPU
# than the engine spends making the token (docs/benchmarks.md): a request that
# arrives with many others in flight gets one more token per message for every
# COALESCE_STEP requests in flight, up to --max-tokens-per-message, and no more
# than fit in the latency budget (--coalesce-budget-ms) at the engine's recent
# time per decode step (StepPace), so that coalescing never stretches the gap
# between a stream's messages beyond the budget. vLLM (stream_interval) never
# holds back the first token nor the last message.
COALESCE_STEP = 4
DEFAULT_COALESCE_BUDGET_S = 0.010
# StepPace: the weight of each new observation in the moving average (about
# the last 50 messages of all streams).
PACE_WEIGHT = 0.02


def tokens_per_message(
    in_flight: int, cap: int, step_s: float | None = None,
    budget_s: float = DEFAULT_COALESCE_BUDGET_S,
) -> int:  # fmt: skip
    """How many tokens the messages of a stream carry, given the requests in
    flight and, once known, the engine's time per decode step."""
    tokens = min(cap, in_flight // COALESCE_STEP)
    if step_s is not None and step_s > 0:
        tokens = min(tokens, int(budget_s / step_s + 1e-9))
    return max(1, tokens)


class StepPace:
    """The engine's recent time per decode step, seen by the streams: the time
    between two messages of one stream over the tokens the second carries (the
    first message, which waited for the prefill, is not a step)."""

    def __init__(self) -> None:
        self.step_s: float | None = None

    def observe(self, elapsed_s: float, tokens: int) -> None:
        if tokens < 1 or elapsed_s < 0:
            return
        sample = elapsed_s / tokens
        if self.step_s is None:
            self.step_s = sample
        else:
            self.step_s += PACE_WEIGHT * (sample - self.step_s)


def default_max_tokens(room: int, limit: int) -> int:
    """max_tokens for a request that left it unset, with `room` tokens left in the context."""
    return min(DEFAULT_MAX_TOKENS, room, limit)
