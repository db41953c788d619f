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


# StepPace: the span of time each estimate of the engine's step covers.
PACE_WINDOW_S = 0.5


class StepPace:
    """The engine's recent time per decode step, seen by the streams: the time
    between two messages of one stream over the tokens the second carries (the
    first message, which waited for the prefill, is not a step).

    The estimate is the ratio of those times to those tokens over every
    message of the last PACE_WINDOW_S, not an average over the last few
    messages. A busy front end hands out messages in bursts: a stall, then
    every stream's message at once, each after a long gap, then the
    catch-up's short ones. An average over the last ~50 messages (a few ms
    at c=64) followed each burst and read 2-2.6x the engine's step under
    load, which cut coalescing to one token per message where the budget
    allowed two or three (docs/benchmarks.md, "Optimisations")."""

    def __init__(self, window_s: float = PACE_WINDOW_S) -> None:
        self.step_s: float | None = None
        self._window_s = window_s
        self._since: float | None = None  # when the current window began
        self._elapsed_s = 0.0
        self._tokens = 0
        self._first_window = True

    def observe(self, elapsed_s: float, tokens: int, now: float) -> None:
        if tokens < 1 or elapsed_s < 0:
            return
        if self._since is None:
            self._since = now
        self._elapsed_s += elapsed_s
        self._tokens += tokens
        closes = now - self._since >= self._window_s
        if closes or self._first_window:
            # The first window's running ratio until it closes; then one
            # estimate per window.
            self.step_s = self._elapsed_s / self._tokens
        if closes:
            self._since, self._elapsed_s, self._tokens = now, 0.0, 0
            self._first_window = False


def default_max_tokens(room: int, limit: int) -> int:
    """max_tokens for a request that left it unset, with `room` tokens left in the context."""
    return min(DEFAULT_MAX_TOKENS, room, limit)
