"""vLLM RequestOutputs of one request to domain deltas."""

from __future__ import annotations

import time
from collections.abc import Sequence

from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput

from llmgrpc_server import domain
from llmgrpc_server.vllm_adapter import failures


class OutputStream:
    """Turns one request's vLLM delta outputs into domain deltas."""

    def __init__(self, request_id: str, prompt_len: int, arrival: float, top_n: int | None):
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.arrival = arrival
        self.top_n = top_n
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def delta(self, output: RequestOutput) -> domain.Delta:
        now = time.monotonic()
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        self.completion_tokens += len(ids)
        if ids and self.first_token_at is None:
            self.first_token_at = now
        delta = domain.Delta(request_id=self.request_id, text=completion.text, token_ids=ids)
        if self.top_n is not None:
            delta.logprobs = _logprobs(ids, completion.logprobs, self.top_n)
        if output.finished:
            # A reason other than stop/length raises: a failure never ends OK.
            delta.finish_reason = failures.finish_reason(output, completion.finish_reason)
            stop = completion.stop_reason
            if isinstance(stop, str):
                delta.stop_string = stop
            elif isinstance(stop, int):
                delta.stop_token_id = stop
            delta.usage = domain.Usage(
                prompt_tokens=self.prompt_len,
                completion_tokens=self.completion_tokens,
                cached_prompt_tokens=int(output.num_cached_tokens or 0),
            )
            first = self.first_token_at if self.first_token_at is not None else now
            delta.timing = domain.Timing(first - self.arrival, now - self.arrival)
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
