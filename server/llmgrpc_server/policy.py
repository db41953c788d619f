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
# COALESCE_STEP requests in flight, up to --max-tokens-per-message. vLLM
# (stream_interval) never holds back the first token nor the last message.
COALESCE_STEP = 4


def tokens_per_message(in_flight: int, cap: int) -> int:
    """How many tokens the messages of a stream carry, given the requests in flight."""
    return max(1, min(cap, in_flight // COALESCE_STEP))


def default_max_tokens(room: int, limit: int) -> int:
    """max_tokens for a request that left it unset, with `room` tokens left in the context."""
    return min(DEFAULT_MAX_TOKENS, room, limit)
