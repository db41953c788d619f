"""vLLM RequestOutputs of one request to domain deltas."""

from __future__ import annotations

import time
from collections.abc import Sequence

from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput

from llmgrpc_server import domain
from llmgrpc_server.vllm_adapter import failures


class OutputStream:
    """Turns one request's vLLM delta outputs into domain deltas.

    With n > 1 vLLM runs a child request per completion; each RequestOutput
    carries the completions (`index`) with news since the last one read:
    usually one, several when the reader fell behind (vLLM's collector merges
    them). The RequestOutput that ends the last child is `finished`.
    """

    def __init__(
        self, request_id: str, prompt_len: int, arrival: float, top_n: int | None, *,
        prompt_top_n: int | None = None, prompt_ids: Sequence[int] = (),
        prompt_tokens: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """`prompt_top_n`: prompt logprobs asked for, of the prompt `prompt_ids`
        (whose strings are `prompt_tokens`)."""
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.arrival = arrival
        self.top_n = top_n
        self.prompt_top_n = prompt_top_n
        self.prompt_ids, self.prompt_tokens = tuple(prompt_ids), tuple(prompt_tokens)
        # Prompt logprob entries received so far (vLLM may send them in chunks).
        self.prompt_entries: list[dict[int, Logprob] | None] = []
        self.prompt_sent = prompt_top_n is None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        # Prompt tokens read from the prefix cache, the fewest any child read:
        # the prompt is the request's once, and later children reuse the
        # blocks of the first.
        self.cached_tokens: int | None = None

    def delta(self, output: RequestOutput) -> domain.Delta:
        """The delta of an output of one completion (n = 1)."""
        (delta,) = self.deltas(output)
        return delta

    def deltas(self, output: RequestOutput) -> list[domain.Delta]:
        """One delta per completion in `output`; the last ends the request
        (usage, timing) when `output` is finished."""
        now = time.monotonic()
        cached = int(output.num_cached_tokens or 0)
        self.cached_tokens = cached if self.cached_tokens is None else min(self.cached_tokens,
                                                                             cached)  # fmt: skip
        deltas = [self._delta(output, completion, now) for completion in output.outputs]
        if not self.prompt_sent:
            deltas[0].prompt_logprobs = self._prompt_logprobs(output)
        last = deltas[-1]
        if output.finished:
            if not self.prompt_sent:
                raise LogprobMismatch(f"{len(self.prompt_entries)} prompt logprob entries "
                                      f"for {self.prompt_len} prompt tokens")  # fmt: skip
            if last.finish_reason is None:  # finished without a reason: INTERNAL
                last.finish_reason = failures.finish_reason(output, None)
            last.usage = domain.Usage(
                prompt_tokens=self.prompt_len,
                completion_tokens=self.completion_tokens,
                cached_prompt_tokens=self.cached_tokens,
            )
            first = self.first_token_at if self.first_token_at is not None else now
            last.timing = domain.Timing(first - self.arrival, now - self.arrival)
        return deltas

    def _prompt_logprobs(self, output: RequestOutput) -> domain.PromptLogprobs | None:
        """The prompt's logprobs once all have come (a first entry, None, and one
        per later token), else None. With n > 1 every child sends its own copy
        (each computes the prompt): the first whole one is kept."""
        entries = list(output.prompt_logprobs or ())
        if entries and not entries[0] and self.prompt_entries:
            return None  # another child's copy, from its start
        self.prompt_entries.extend(entries)
        if len(self.prompt_entries) < self.prompt_len:
            return None
        assert self.prompt_top_n is not None
        logprobs = _logprobs(list(self.prompt_ids[1:]), self.prompt_entries[1:], self.prompt_top_n)
        self.prompt_sent = True
        return domain.PromptLogprobs(self.prompt_ids, self.prompt_tokens, tuple(logprobs))

    def _delta(self, output: RequestOutput, completion: CompletionOutput, now: float
               ) -> domain.Delta:  # fmt: skip
        ids = list(completion.token_ids)
        self.completion_tokens += len(ids)
        if ids and self.first_token_at is None:
            self.first_token_at = now
        delta = domain.Delta(request_id=self.request_id, text=completion.text, token_ids=ids,
                             index=completion.index)  # fmt: skip
        if self.top_n is not None:
            delta.logprobs = _logprobs(ids, completion.logprobs, self.top_n)
        if completion.finish_reason is not None:
            # A reason other than stop/length raises: a failure never ends OK.
            delta.finish_reason = failures.finish_reason(output, completion.finish_reason)
            stop = completion.stop_reason
            if isinstance(stop, str):
                delta.stop_string = stop
            elif isinstance(stop, int):
                delta.stop_token_id = stop
        return delta


class LogprobMismatch(RuntimeError):
    """vLLM's logprobs do not line up with its token ids: a bug, not bad input."""


def _logprobs(
    ids: list[int], entries: Sequence[dict[int, Logprob] | None] | None, top_n: int
) -> list[domain.TokenLogprob]:
    # One entry per token id, each holding that token: anything else would
    # give a caller logprobs of the wrong tokens, so it fails the call instead.
    entries = entries or []
    if len(entries) != len(ids):
        raise LogprobMismatch(f"{len(entries)} logprob entries for {len(ids)} token ids")
    return [_token_logprob(token, entry, top_n) for token, entry in zip(ids, entries, strict=True)]


def _token_logprob(token: int, entry: dict[int, Logprob] | None, top_n: int) -> domain.TokenLogprob:
    if not entry or token not in entry:
        raise LogprobMismatch(f"the logprob entry for token {token} does not hold it")
    sampled = entry[token]
    top = sorted(
        (v.rank, k, v) for k, v in entry.items() if v.rank is not None and v.rank <= top_n
    )
    return domain.TokenLogprob(
        token_id=token,
        token=sampled.decoded_token or "",
        logprob=float(sampled.logprob),
        rank=int(sampled.rank or 0),
        top=tuple(domain.TopLogprob(k, v.decoded_token or "", float(v.logprob)) for _, k, v in top),
    )
