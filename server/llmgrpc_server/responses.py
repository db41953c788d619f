"""Pure conversion of the engine's results (domain types) into protobuf answers."""

from __future__ import annotations

from collections.abc import Iterator

from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import domain

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    domain.FinishReason.STOP: pb.FINISH_REASON_STOP,
    domain.FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}  # FINISH_REASON_ABORT is never sent (docs/api.md)


def to_generate_response(delta: domain.Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=delta.request_id, text=delta.text, token_ids=delta.token_ids,
        index=delta.index,
    )  # fmt: skip
    if delta.prompt_logprobs is not None:
        _set_prompt_logprobs(msg, delta.prompt_logprobs)
    if delta.finish_reason is None and not delta.logprobs and delta.usage is None:
        return msg  # most messages of a stream: nothing else to set
    _set_completion(msg, delta)
    _set_request_facts(msg, delta)
    return msg


def _set_prompt_logprobs(msg: pb.GenerateResponse, prompt: domain.PromptLogprobs | None) -> None:
    if prompt is not None:
        msg.prompt_logprobs.CopyFrom(pb.PromptLogprobs(
            token_ids=prompt.token_ids, tokens=prompt.tokens,
            logprobs=[_token_logprob(lp) for lp in prompt.logprobs],
        ))  # fmt: skip


def _set_completion(msg: pb.GenerateResponse | pb.Completion, delta: domain.Delta) -> None:
    """The fields describing one completion, which both messages name alike."""
    msg.finish_reason = _FINISH[delta.finish_reason]
    if delta.logprobs:
        msg.logprobs.extend(_token_logprob(lp) for lp in delta.logprobs)
    if delta.stop_string is not None:
        msg.stop_string = delta.stop_string
    elif delta.stop_token_id is not None:
        msg.stop_token_id = delta.stop_token_id


def _token_logprob(lp: domain.TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id, token=lp.token, logprob=lp.logprob, rank=lp.rank,
        top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
             for t in lp.top],
    )  # fmt: skip


def _set_request_facts(msg: pb.GenerateResponse, delta: domain.Delta) -> None:
    """Usage and timing: the request's, on its last message."""
    if delta.usage is not None:
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=delta.usage.prompt_tokens,
                completion_tokens=delta.usage.completion_tokens,
                cached_prompt_tokens=delta.usage.cached_prompt_tokens,
            )
        )
    if delta.timing is not None:
        msg.timing.CopyFrom(
            pb.Timing(
                time_to_first_token=delta.timing.time_to_first_token, total=delta.timing.total
            )
        )


def to_unary_response(deltas: list[domain.Delta], n: int) -> pb.GenerateResponse:
    """What Generate returns: with n = 1 the one completion in the top-level
    fields, as ever; with n > 1 every completion in `completions`, by index."""
    if n == 1:
        return to_generate_response(merge_deltas(deltas))
    final = deltas[-1]
    msg = pb.GenerateResponse(request_id=final.request_id)
    _set_prompt_logprobs(msg, deltas[0].prompt_logprobs)
    for index in range(n):
        merged = merge_deltas([d for d in deltas if d.index == index] or [final])
        completion = msg.completions.add(index=index, text=merged.text,
                                         token_ids=merged.token_ids)  # fmt: skip
        _set_completion(completion, merged)
    _set_request_facts(msg, final)
    return msg


def merge_deltas(deltas: list[domain.Delta]) -> domain.Delta:
    """Fold deltas of one completion into one: what unary Generate returns."""
    final = deltas[-1]
    return domain.Delta(
        request_id=final.request_id,
        index=final.index,
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=[lp for d in deltas for lp in d.logprobs],
        finish_reason=final.finish_reason,
        stop_string=final.stop_string,
        stop_token_id=final.stop_token_id,
        usage=final.usage,
        timing=final.timing,
        prompt_logprobs=deltas[0].prompt_logprobs,
    )


def tokenize_response_head(t: domain.Tokenized) -> pb.TokenizeResponse:
    """Everything but the offsets (each a message: see add_offsets)."""
    return pb.TokenizeResponse(
        token_ids=t.token_ids, tokens=t.tokens, text=t.text, max_model_len=t.max_model_len
    )


def add_offsets(
    msg: pb.TokenizeResponse, offsets: tuple[tuple[int, int], ...], per_slice: int
) -> Iterator[None]:
    """Add `offsets` to `msg`, yielding after each `per_slice` of them, so the
    caller can let other work run between slices."""
    # add() in place: a tenth of the time of building each Offset, then copying it in.
    add, step = msg.offsets.add, max(per_slice, 1)
    for at in range(0, len(offsets), step):
        for start, end in offsets[at : at + step]:
            add(start=start, end=end)
        yield
