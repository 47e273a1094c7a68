"""A turn's Generate call, resumed when it breaks.

Until text of the reply has been delivered (to the client and to TTS), a broken call is simply
made again. After that the LLM regenerates, and the new text is spliced onto the reply only if it
starts with exactly what was delivered: greedy decoding on a deterministic backend repeats
itself, so the caller hears one whole reply. A sampled regeneration almost never does, and
waiting longer cannot make it match, so one regeneration decides, at its first character that
differs from the delivered text (or at its end, if it ends before reaching it): the call is
dropped and the reply ends where the delivered text ends. The caller hears all of it (the
unfinished last sentence too, so speech matches the text shown), the history keeps it, and the
turn ends with a cut-short notice instead of TurnCompleted (`cut_short`, see turns.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from orchestrator.breaker import BreakerOpen
from orchestrator.calls import DeadlinePassed, StageCall, call_metadata
from orchestrator.reply import Reply
from orchestrator.retry import TURN_CALLS_WAIT_FOR_READY, StageFailed, resume_turn_stream
from orchestrator.timings import TurnTimings
from orchestrator.upstreams import Upstream
from voice.v1 import common_pb2, language_model_pb2, language_model_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb

log = logging.getLogger(__name__)


class Generation:
    """The LLM stream of one turn; it writes the turn's Reply."""

    def __init__(
        self,
        upstream: Upstream,
        messages: list[language_model_pb2.ChatMessage],
        max_tokens: int,
        correlation: common_pb2.Correlation,
        deadline: float,
        timings: TurnTimings,
    ) -> None:
        self._upstream = upstream
        self._stub = language_model_pb2_grpc.LanguageModelServiceStub(upstream.channel)
        self._request = language_model_pb2.GenerateRequest(
            messages=messages,
            parameters=language_model_pb2.GenerationParameters(max_tokens=max_tokens),
            correlation=correlation,
        )
        self._deadline = deadline
        self._metadata = call_metadata(correlation)
        self._timings = timings
        self._delivered = ""  # text already handed to the client and to TTS
        self._opened: StageCall | None = None
        # Set when the reply was ended at the delivered text: the notice for the client.
        self.cut_short: StageFailed | None = None

    def open_early(self) -> None:
        """Sends the Generate request now, ahead of whatever the caller does next (the LLM is on
        the critical path); the first attempt of run() takes the call."""
        # If the breaker is open or time is up, the first attempt meets it again and reports it.
        with contextlib.suppress(BreakerOpen, DeadlinePassed):
            self._opened = self._open()

    def close(self) -> None:
        """Cancels a call opened early that no attempt took (the turn never ran this far)."""
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.close()

    async def run(self, reply: Reply) -> None:
        """Raises StageFailed when the LLM fails for good."""
        started = time.monotonic()
        await resume_turn_stream(pb.STAGE_LLM, lambda: self._attempt(reply))
        # Flushes a reply whose stream ended without GenerationComplete, or was cut short.
        await reply.finish()
        log.debug("llm done", extra={"chars": len(reply.text), "s": time.monotonic() - started})

    def _open(self) -> StageCall:
        return StageCall.open(self._upstream, self._deadline, self._start)

    def _start(self, timeout: float) -> Any:
        self._timings.llm_call_started_at = time.monotonic()
        # Not wait-for-ready (see TURN_CALLS_WAIT_FOR_READY).
        return self._stub.Generate(
            self._request, timeout=timeout, metadata=self._metadata, wait_for_ready=TURN_CALLS_WAIT_FOR_READY
        )

    async def _attempt(self, reply: Reply) -> None:
        opened, self._opened = self._opened, None
        async with opened or self._open() as call:
            received = ""
            async for response in call.rpc:
                if response.HasField("complete"):
                    self._timings.llm_ttft = response.complete.time_to_first_token
                    # No more text: the last sentence goes to TTS now, not after the call's
                    # status arrives (for a one-sentence reply that is the first audio).
                    await reply.flush()
                    continue
                received += response.delta.text
                if not self._continues(received):
                    self._cut_short()
                    return  # the call is cancelled: the LLM stops generating
                if len(received) <= len(self._delivered):
                    continue
                self._timings.last_llm_elapsed = response.delta.elapsed
                new_text = received[len(self._delivered) :]
                self._delivered = received
                await reply.add(new_text, response.delta.elapsed)
            if len(received) < len(self._delivered):  # the regeneration ended short of it
                self._cut_short()

    def _cut_short(self) -> None:
        chars = len(self._delivered)
        log.warning(
            "regenerated reply differs from the text delivered; the reply ends there", extra={"chars": chars}
        )
        self.cut_short = StageFailed(
            pb.STAGE_LLM,
            "DATA_LOSS",
            f"reply cut short after {chars} characters: the LLM stream broke and its regeneration"
            " differs from the text already delivered",
        )

    def _continues(self, received: str) -> bool:
        """Whether a (regenerated) stream still agrees with the text delivered so far."""
        if len(received) <= len(self._delivered):
            return self._delivered.startswith(received)
        return received.startswith(self._delivered)
