"""Tokenize and Detokenize without holding the event loop.

Hugging Face's `tokenizer(text)` and `tokenizer.decode(ids)` hold the GIL for
most of their work even in a thread: `decode` runs in Rust with the GIL held
(~25 ms for 65,536 ids here), and `__call__` turns every encoding into Python
lists in transformers' own code (~45 ms for 131,072 characters). While a
thread holds the GIL, the event loop cannot answer anything, health checks
included (docs/reliability.md, "Limits").

The Rust tokenizer's batch methods release the GIL for the whole Rust part,
so here the large calls use `encode_batch` / `decode_batch` of a private copy
of the model's Rust tokenizer: the same function transformers calls, so the
same ids, offsets and text (tests/unit/test_codec.py), with the GIL held only
to move the results into Python. The copy is never changed after it is made,
so threads can share it (vLLM's own tokenizer is a pool of copies because
transformers changes its truncation settings on calls).

A tokenizer that is not a Rust "fast" tokenizer, or one whose decode adds
transformers' clean-up pass, keeps transformers' calls.

Token strings come from a table of the whole vocabulary made once: a lookup
per id in C instead of transformers' Python call per id (25x faster).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# How much lower the tokenizer threads run than the event loop (nice 0 -> this).
BACKGROUND_NICE = 10


def _lower_priority() -> None:
    """Run this thread below the event loop's priority (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError) as e:  # not Linux, or not allowed
        log.debug("tokenizer threads keep the loop's priority: %s", e)


class Codec:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust: Any = None
        if backend is not None and hasattr(backend, "encode_batch"):
            self._rust = type(backend).from_str(backend.to_str())
            # What transformers sets for a call without truncation or padding.
            self._rust.no_truncation()
            self._rust.no_padding()
        # Every id's token string, as convert_ids_to_tokens gives it (made
        # here, at startup, where its ~50 ms per 50,000 ids delay nobody).
        self._vocab: list[str] | None = None
        if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "__len__"):
            self._vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="llmgrpc-tokenizer", initializer=_lower_priority
        )
        # transformers' decode cleans up spaces after the Rust decode when asked to.
        self._rust_decode = self._rust is not None and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False
        )

    async def in_background(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a tokenizer thread, below the event loop's CPU priority."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def encode(
        self, text: str, add_special_tokens: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The token ids and each one's (start, end) character offsets in `text`."""
        if self._rust is None:
            enc = self._tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            return list(enc["input_ids"]), list(enc["offset_mapping"])
        encoding = self._rust.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        # `encoding.offsets` makes every (start, end) tuple in one call that
        # holds the GIL (~22 ms at 131,072 characters, the longest hold left in
        # a Tokenize); a call per token lets the loop take the GIL between
        # them. Tokens the post-processor added (BOS...) have no characters:
        # None here, (0, 0) in `offsets`.
        span = encoding.token_to_chars
        return encoding.ids, [span(i) or (0, 0) for i in range(len(encoding))]

    def tokens(self, token_ids: list[int]) -> list[str]:
        """Each id's token string (the ids are the tokenizer's own: in the table)."""
        if self._vocab is None:
            return list(self._tokenizer.convert_ids_to_tokens(token_ids))
        return list(map(self._vocab.__getitem__, token_ids))

    def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if not self._rust_decode:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
        return str(self._rust.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0])
