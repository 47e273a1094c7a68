"""LanguageModelService.Generate: streams the deterministic reply of `stubs.replies` token by
token, paced by the latency profile."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from llm_stub import validation
from stubs import replies
from stubs.faults import FaultSettings
from stubs.latency import LatencyProfile, sleep_until
from voice.v1 import language_model_pb2, language_model_pb2_grpc
from voicepipe import durations
from voicepipe.config import ServerSettings
from voicepipe.logs import bind_correlation
from voicepipe.server import GrpcService, Registration
from voicepipe.stub_entry import accept

log = logging.getLogger(__name__)

SERVICE_NAME = language_model_pb2.DESCRIPTOR.services_by_name["LanguageModelService"].full_name

GenerateContext = grpc.aio.ServicerContext[
    language_model_pb2.GenerateRequest, language_model_pb2.GenerateResponse
]


class TokenPacer:
    """When each token is due: the first after `first_token_ms`, then `tokens_per_second`.
    Due times are measured from the request so that sleeping late never accumulates drift."""

    def __init__(self, profile: LatencyProfile, received: float) -> None:
        self._first = received + profile.llm_first_token_ms / 1000
        self._interval = 1 / profile.llm_tokens_per_second if profile.llm_tokens_per_second > 0 else 0.0

    async def wait_for(self, index: int) -> None:
        await sleep_until(self._first + index * self._interval)


class LanguageModelServicer(language_model_pb2_grpc.LanguageModelServiceServicer):
    def __init__(self, profile: LatencyProfile) -> None:
        self._profile = profile

    async def Generate(
        self, request: language_model_pb2.GenerateRequest, context: GenerateContext
    ) -> AsyncIterator[language_model_pb2.GenerateResponse]:
        received = time.monotonic()
        # grpc.aio runs each call in its own task, so these ids stay with this call's log lines.
        bind_correlation(request.correlation.session_id, request.correlation.turn_id)
        try:
            messages = validation.conversation(request)
            budget = validation.max_tokens(request.parameters)
            validation.check_temperature(request.parameters)
        except validation.InvalidRequest as exc:
            log.info("rejected request", extra={"reason": str(exc)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await accept(context)

        tokens = replies.tokenize(replies.reply(messages))
        finish = language_model_pb2.FINISH_REASON_STOP
        if len(tokens) > budget:
            tokens = tokens[:budget]
            finish = language_model_pb2.FINISH_REASON_LENGTH
        pacer = TokenPacer(self._profile, received)
        first_token_s = last_token_s = 0.0
        sent = 0
        try:
            for index, token in enumerate(tokens):
                await pacer.wait_for(index)
                last_token_s = time.monotonic() - received
                if index == 0:
                    first_token_s = last_token_s
                yield language_model_pb2.GenerateResponse(
                    delta=language_model_pb2.TextDelta(
                        text=token, elapsed=durations.from_seconds(last_token_s)
                    ),
                    correlation=request.correlation,
                )
                sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: stop generating at once (a pacing sleep or a yield).
            log.info("generation cancelled", extra={"completion_tokens": sent})
            raise
        log.info(
            "generated",
            extra={
                "reply_chars": sum(map(len, tokens)),
                "completion_tokens": len(tokens),
                "finish_reason": language_model_pb2.FinishReason.Name(finish),
                "ttft_ms": round(first_token_s * 1000, 1),
                "total_ms": round(last_token_s * 1000, 1),
            },
        )
        yield language_model_pb2.GenerateResponse(
            complete=language_model_pb2.GenerationComplete(
                finish_reason=finish,
                usage=language_model_pb2.TokenUsage(
                    prompt_tokens=sum(replies.count_words(m.text) for m in messages),
                    completion_tokens=len(tokens),
                ),
                time_to_first_token=durations.from_seconds(first_token_s),
                total_time=durations.from_seconds(last_token_s),
            ),
            correlation=request.correlation,
        )


def build_service(settings: ServerSettings, profile: LatencyProfile, faults: FaultSettings) -> GrpcService:
    """The LLM stub server: LanguageModelService plus the shared runtime."""
    registration = Registration(
        full_name=SERVICE_NAME,
        add_to_server=language_model_pb2_grpc.add_LanguageModelServiceServicer_to_server,
        servicer=LanguageModelServicer(profile),
    )
    return GrpcService("llm_stub", settings, [registration], faults.interceptors())
