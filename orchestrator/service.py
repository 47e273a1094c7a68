"""VoiceAgentService: admission (session limit), config validation, then the conversation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from orchestrator.auth import Gate, OpenGate, Refused
from orchestrator.metrics import ACTIVE_SESSIONS, SESSIONS_REJECTED
from orchestrator.output import SessionFailed
from orchestrator.session import Conversation, SessionLimits
from orchestrator.tickets import TicketRejected, Tickets
from orchestrator.turn import TurnSettings
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, language_model_pb2, resumption_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import InvalidInput, parse_audio_format
from voicepipe.handlers import drain
from voicepipe.logs import session_id_var, tenant_var

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128
# A client must send its config this soon after opening the call.
CONFIG_TIMEOUT_S = 10.0


class SessionSlots:
    """The session limit. A slot is freed once, by whichever comes first: the call's end, or the
    session's failure (a client that stopped reading may hold its call open much longer)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> Callable[[], None] | None:
        """A function that frees the slot (idempotent), or None at the limit."""
        if self.active >= self.limit:
            return None
        self.active += 1
        ACTIVE_SESSIONS.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1
                ACTIVE_SESSIONS.dec()

        return release


class OpenConversations:
    """The conversations in progress, for a drain, and by tenant and session id, so that a
    resumed conversation takes over a call of the same conversation still open here."""

    def __init__(self) -> None:
        self.draining = False
        self._all: set[Conversation] = set()
        self._by_session: dict[tuple[str, str], Conversation] = {}

    def add(self, tenant: str, conversation: Conversation) -> Callable[[], None]:
        """Registers `conversation` (ending the older call of it if it is resumed); returns the
        function that unregisters it."""
        key = (tenant, conversation.session_id)
        if conversation.resumed and (older := self._by_session.get(key)) is not None:
            log.info("resumed conversation takes over its older call")
            older.take_over()
        if conversation.resumed or key not in self._by_session:
            self._by_session[key] = conversation
        self._all.add(conversation)

        def remove() -> None:
            self._all.discard(conversation)
            if self._by_session.get(key) is conversation:
                del self._by_session[key]

        return remove

    def drain(self) -> None:
        """Every conversation ends after the turn it is playing; new ones are refused."""
        self.draining = True
        log.info("draining conversations", extra={"conversations": len(self._all)})
        for conversation in self._all:
            conversation.drain()


class VoiceAgentServicer(voice_agent_pb2_grpc.VoiceAgentServiceServicer):
    def __init__(
        self,
        upstreams: Upstreams,
        limits: SessionLimits,
        max_sessions: int,
        gate: Gate | None = None,
        tickets: Tickets | None = None,
    ) -> None:
        """With `tickets`, every conversation gets resumption tickets and may be resumed."""
        self._upstreams = upstreams
        self._limits = limits
        self._slots = SessionSlots(max_sessions)
        self._gate = gate or OpenGate()
        self._tickets = tickets
        self.conversations = OpenConversations()

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ConverseResponse]:
        try:
            if self.conversations.draining:
                raise Refused(
                    grpc.StatusCode.UNAVAILABLE, "the orchestrator is shutting down; retry", "draining"
                )
            admission = self._gate.admit(context.invocation_metadata())
        except Refused as refused:
            SESSIONS_REJECTED.labels(refused.reason).inc()
            log.info("session refused", extra={"code": refused.code.name, "detail": refused.message})
            await self._refuse(request_iterator, context, refused.code, refused.message)
            return
        tenant_var.set(admission.tenant)
        release_slot = self._slots.acquire()

        def release() -> None:
            admission.release()
            if release_slot is not None:
                release_slot()

        if release_slot is None:
            release()
            SESSIONS_REJECTED.labels("session_limit").inc()
            await self._refuse(
                request_iterator,
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session limit of {self._slots.limit} concurrent conversations reached; retry later",
            )
            return
        remove = None
        try:
            conversation = await self._open(request_iterator, context, admission.tenant, release)
            session_id_var.set(conversation.session_id)
            remove = self.conversations.add(admission.tenant, conversation)
            if self.conversations.draining:
                conversation.drain()
            log.info(
                "session started",
                extra={"active_sessions": self._slots.active, "resumed": conversation.resumed},
            )
            try:
                async for response in conversation.run(request_iterator):
                    yield response
            except SessionFailed as failure:
                log.warning("session failed", extra={"code": failure.code.name, "detail": failure.message})
                await context.abort(failure.code, failure.message)
            log.info("session ended")
        finally:
            if remove is not None:
                remove()
            release()

    @staticmethod
    async def _refuse(
        requests: AsyncIterator[pb.ConverseRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Ends a call that is not admitted once the client has stopped writing (see drain()), so
        that its writes do not cross the status."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await drain(requests)
        await context.abort(code, message)

    async def _open(
        self,
        requests: AsyncIterator[pb.ConverseRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        tenant: str,
        release: Callable[[], None],
    ) -> Conversation:
        try:
            async with asyncio.timeout(CONFIG_TIMEOUT_S):
                first = await anext(requests, None)
        except TimeoutError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no config within {CONFIG_TIMEOUT_S:g} s")
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the config message")
        try:
            return self._conversation(first, context, tenant, release)
        except InvalidInput as error:
            SESSIONS_REJECTED.labels("invalid_config").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except TicketRejected as rejected:
            SESSIONS_REJECTED.labels("bad_ticket").inc()
            log.info(
                "resumption ticket rejected", extra={"code": rejected.code.name, "detail": rejected.message}
            )
            await context.abort(rejected.code, rejected.message)
        raise AssertionError("unreachable")  # abort() raises

    def _conversation(
        self,
        first: pb.ConverseRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        tenant: str,
        release: Callable[[], None],
    ) -> Conversation:
        kind = first.WhichOneof("request")
        if kind != "config":
            raise InvalidInput(f"the first message must be config, got {kind or 'an empty request'}")
        config = first.config
        resumed = bool(config.resumption_ticket)
        if resumed:
            if self._tickets is None:
                raise TicketRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this orchestrator does not resume conversations (it has no --resumption-keys-file)",
                )
            start = self._tickets.open(config.resumption_ticket, tenant)
        else:
            start = self._new_conversation(config, tenant)
        input_format = parse_audio_format(start.input_audio_format, "config.input_audio_format")
        output_format = parse_audio_format(start.output_audio_format, "config.output_audio_format")
        remaining = context.time_remaining()
        return Conversation(
            start,
            input_format,
            TurnSettings(
                output_format=output_format,
                voice=start.voice,
                audio_lead_s=self._limits.reply_audio_lead_s,
                first_segment=self._limits.first_segment,
                reply_max_tokens=self._limits.reply_max_tokens,
            ),
            self._upstreams,
            self._limits,
            self._tickets,
            client_deadline=time.monotonic() + remaining if remaining is not None else None,
            on_stop=release,
            resumed=resumed,
        )

    @staticmethod
    def _new_conversation(config: pb.SessionConfig, tenant: str) -> resumption_pb2.ResumptionState:
        """Where a conversation without a ticket starts: its settings and its system prompt."""
        output = config.output_audio_format
        if output.encoding == common_pb2.AUDIO_ENCODING_UNSPECIFIED:
            output = common_pb2.AudioFormat(
                encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=output.sample_rate_hertz
            )
        if len(config.session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidInput(f"config.session_id is longer than {MAX_SESSION_ID_CHARS} characters")
        start = resumption_pb2.ResumptionState(
            session_id=config.session_id or uuid.uuid4().hex[:16],
            tenant=tenant,
            input_audio_format=config.input_audio_format,
            output_audio_format=output,
            voice=config.voice,
        )
        if config.system_prompt:
            start.history.append(
                language_model_pb2.ChatMessage(
                    role=language_model_pb2.ROLE_SYSTEM, content=config.system_prompt
                )
            )
        return start
