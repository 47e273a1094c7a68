"""One conversation: a Converse call with a microphone task sending the caller's audio and a
reader task assembling the agent's turns.

The conversation outlives its call. The server sends a resumption ticket after every turn; when
the call ends with UNAVAILABLE (its orchestrator drained or went away), the library opens a new
call with the latest ticket (on whichever replica the channel reaches), resends the caller audio
the ticket does not cover (from its `audio_offset`, the rule the orchestrator's own STT replay
follows) and the typed turns not yet answered, then carries on: the application sees one
conversation, each move recorded as a `Resumed` notice with the gap."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration

from voice.v1 import common_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe.audio_format import PcmFormat
from voicepipe_client.audio import Utterance
from voicepipe_client.microphone import Microphone, Speech
from voicepipe_client.turns import Turn, TurnAssembler

if TYPE_CHECKING:
    from voice.v1.voice_agent_pb2_grpc import VoiceAgentServiceAsyncStub

PCM_16K = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
END_OF_INPUT = pb.ConverseRequest(control=pb.ControlMessage(type=pb.CONTROL_TYPE_END_OF_INPUT))
BARGE_IN = pb.ConverseRequest(control=pb.ControlMessage(type=pb.CONTROL_TYPE_BARGE_IN))

# Calls opened in a row to continue a conversation before giving up, the first at once, then
# after a wait doubling from RESUME_FIRST_WAIT_S up to RESUME_MAX_WAIT_S; and how long the
# channel may take to reach a replica for each.
MAX_RESUME_ATTEMPTS = 8
RESUME_FIRST_WAIT_S = 0.05
RESUME_MAX_WAIT_S = 1.0
RESUME_CONNECT_TIMEOUT_S = 10.0
# What a grpc.aio client reports instead of a call's status when one of its writes crossed the
# end of the call (grpc/grpc#36066): seen when a replica dies while the microphone writes. Not a
# status a server sends, so it counts as the call having gone away.
CROSSED_WRITE = (grpc.StatusCode.INTERNAL, "Internal error from Core")
# How long a crossed write waits for the channel to leave READY, which tells a call lost with its
# connection (UNAVAILABLE, as gRPC reports it when no write crosses) from one the server ended.
CONNECTION_LOST_S = 1.0
# Caller audio kept for a new call at most (as the orchestrator's own STT replay keeps): a longer
# stretch no ticket covers (a minute of silence) loses its oldest part, and the offsets of the
# call after a move are then that much early.
MAX_RESEND_S = 60.0


class ConversationEnded(Exception):
    """Input for a conversation that is over: its call ended and was not continued."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        how = "" if code is None else f" ({code.name}{': ' + details if details else ''})"
        super().__init__(f"the conversation has ended{how}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class SessionSettings:
    """What the first message of the call (SessionConfig) says. `resumption_ticket` continues an
    earlier conversation (one the application kept the `ticket` of)."""

    input_format: PcmFormat = PCM_16K
    output_format: PcmFormat = PCM_16K
    session_id: str = ""
    system_prompt: str = ""
    resumption_ticket: bytes = b""

    def config(self) -> pb.ConverseRequest:
        return pb.ConverseRequest(
            config=pb.SessionConfig(
                input_audio_format=self.input_format.to_proto(),
                output_audio_format=self.output_format.to_proto(),
                session_id=self.session_id,
                system_prompt=self.system_prompt,
                resumption_ticket=self.resumption_ticket,
            )
        )


@dataclass(frozen=True)
class Resumed:
    """The conversation moved to a new call. Times are time.monotonic()."""

    code: grpc.StatusCode  # how the call before ended
    details: str
    broken_at: float  # when it ended
    last_audio_at: float | None  # the last reply audio received before (None: none yet)
    resumed_at: float  # the first event of the new call
    attempts: int  # calls opened to get there

    @property
    def gap_s(self) -> float:
        """What the caller heard of the move: from the last reply audio before it (or from the
        end of the call, if no audio had come) to the first event after it."""
        since = self.last_audio_at if self.last_audio_at is not None else self.broken_at
        return self.resumed_at - since


def _samples(offset: Duration, rate: int) -> int:
    return round(offset.ToNanoseconds() * rate / 1e9)


class SentAudio:
    """The caller audio sent that the latest ticket does not cover (at most MAX_RESEND_S),
    placed by sample in the conversation's audio (over all its calls)."""

    def __init__(self, fmt: PcmFormat) -> None:
        self._bytes_per_sample = fmt.bytes_per_sample
        self._limit = int(MAX_RESEND_S * fmt.sample_rate)
        self._max_message = fmt.max_message_bytes
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.end_sample = 0
        self.keeping = True  # False once the server is known to send no tickets

    def add(self, data: bytes) -> None:
        if self.keeping:
            self._frames.append((self.end_sample, data))
        self.end_sample += len(data) // self._bytes_per_sample
        self.forget_before(self.end_sample - self._limit)

    def stop_keeping(self) -> None:
        self.keeping = False
        self._frames.clear()

    def forget_before(self, sample: int) -> None:
        """Covered by a ticket: audio before `sample` will not be needed again."""
        while (
            self._frames and self._frames[0][0] + len(self._frames[0][1]) // self._bytes_per_sample <= sample
        ):
            self._frames.popleft()

    def since(self, sample: int) -> list[bytes]:
        """The audio from `sample` on, in as few messages as the contract allows (a new call
        answers once they are all written)."""
        audio = b"".join(
            data[max(0, sample - start) * self._bytes_per_sample :]
            for start, data in self._frames
            if start + len(data) // self._bytes_per_sample > sample
        )
        return [audio[i : i + self._max_message] for i in range(0, len(audio), self._max_message)]


class Conversation:
    """One conversation, used as `async with Conversation(...) as conversation:` (leaving the
    block cancels the call if it is still open). `assembler` builds the turns from what the
    server sends; `metadata` goes out with every call (a gateway's per-caller bearer token). With
    `resume` (the default) it continues on a new call when its call ends with UNAVAILABLE and a
    ticket is held; `resumptions` lists the moves."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        settings: SessionSettings,
        *,
        microphone: Microphone,
        timeout_s: float | None = None,
        assembler: TurnAssembler | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        resume: bool = True,
    ) -> None:
        self.settings = settings
        self.microphone = microphone
        self.assembler = assembler or TurnAssembler(settings.output_format)
        self._channel = channel
        self._metadata = metadata
        self._stub: VoiceAgentServiceAsyncStub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.call = self._new_call()
        self.code: grpc.StatusCode | None = None  # once the conversation has ended
        self.details = ""
        self.ticket: pb.ResumptionTicket | None = None  # the latest
        self.resumptions: list[Resumed] = []
        self._resume = resume
        self._sent_audio = SentAudio(settings.input_format)
        if not resume:
            self._sent_audio.stop_keeping()
        self._texts: list[tuple[Turn, pb.ConverseRequest]] = []  # typed turns no ticket covers yet
        self._input_ended = False
        self._closing = False
        self._over = False
        self._call_changed = asyncio.Event()
        self._attempts = 0  # calls opened since the last one that answered
        self._move: tuple[grpc.StatusCode, str, float] | None = None  # the call ended, not answered yet
        self._last_audio_at: float | None = None
        self._retired: object = None  # a call the server is draining: nothing more is written to it
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    def _new_call(self) -> grpc.aio.StreamStreamCall[pb.ConverseRequest, pb.ConverseResponse]:
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        return self._stub.Converse(timeout=timeout, metadata=self._metadata, wait_for_ready=True)

    async def open(self, *, read: bool = True) -> Conversation:
        """Sends the config and starts the microphone and (if `read`) the reader."""
        await self.call.write(self.settings.config())
        self._sender = asyncio.create_task(
            self.microphone.run(
                self.settings.input_format, self._write, self.assembler.expect, self.assembler.session_started
            ),
            name="client-microphone",
        )
        if read:
            self.start_reading()
        return self

    def start_reading(self) -> None:
        assert self._reader is None, "already reading"
        self._reader = asyncio.create_task(self._read(), name="client-reader")

    async def close(self) -> None:
        """Cancels the call (if still open), the microphone and the reader."""
        self._closing = True
        self.call.cancel()
        await cancel_and_wait(self._reader, self._sender)

    async def __aenter__(self) -> Conversation:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- input -----------------------------------------------------------------------------

    def say(self, utterance: Utterance) -> Turn:
        """Queues `utterance` for the microphone; returns the turn it will start (started once
        the server says so: see Turn's events; over without starting if the conversation ends
        first). Raises ConversationEnded once the conversation is over."""
        turn = Turn()
        self._queue(Speech(utterance, turn))
        return turn

    async def speak(self, utterance: Utterance) -> Turn:
        """say(), returning once every frame of `utterance` has left (or never will)."""
        turn = Turn()
        speech = Speech(utterance, turn)
        self._queue(speech)
        await speech.sent.wait()
        return turn

    def play(self, utterance: Utterance) -> Speech:
        """Queues audio that starts no turn the caller waits for (a recording, silence)."""
        speech = Speech(utterance)
        self._queue(speech)
        return speech

    def _queue(self, speech: Speech) -> None:
        if self._over:
            raise ConversationEnded(self.code, self.details)
        self.microphone.queue.put(speech)

    async def send_audio(self, audio: bytes) -> bool:
        """Sends caller audio now, beside the microphone (audio relayed from a live source);
        False once the call has ended."""
        return await self._write(pb.ConverseRequest(audio=audio))

    async def type(self, text: str) -> Turn:
        """Sends a text turn now; returns the turn it starts. Raises ConversationEnded once the
        conversation is over (no turn would ever start)."""
        async with self._write_lock:
            if self._over:
                raise ConversationEnded(self.code, self.details)
            turn = Turn(speech_ended_at=time.monotonic())
            self.assembler.expect(turn)
            request = pb.ConverseRequest(text=pb.TextTurn(text=text))
            if self._sent_audio.keeping:  # sent again on a new call until a ticket covers it
                self._texts.append((turn, request))
            await self._send(request)
        return turn

    async def interrupt(self) -> bool:
        """Tells the server the caller interrupts the agent now (a push-to-talk button pressed
        while it speaks; speech over a reply needs nothing more): the turn being played, if any,
        stops and ends interrupted. False if the call has ended or is being moved (the
        interruption is not sent again on the new call)."""
        async with self._write_lock:
            return await self._send(BARGE_IN)

    async def barge_in(self, turn: Turn, utterance: Utterance, *, after_s: float) -> Turn:
        """Speaks `utterance` over `turn`'s reply once the caller has heard `after_s` of it (at
        once if the turn ended without audio); returns the turn the utterance starts."""
        await turn.first_audio.wait()
        if turn.first_audio_at is not None:
            # The caller listens (reply audio arrives paced in real time), then speaks.
            await asyncio.sleep(max(0.0, turn.first_audio_at + after_s - time.monotonic()))
        return self.say(utterance)

    async def end_input(self) -> None:
        """END_OF_INPUT once the microphone has said everything it was given, then half-close:
        the server finishes the turn in progress and ends the call."""
        self.microphone.queue.close()
        if self._sender is not None:
            await asyncio.wait([self._sender])
            self._sender.result()  # a failure of the microphone itself
        async with self._write_lock:
            self._input_ended = True
            await self._end_writing()

    async def _end_writing(self) -> None:
        if await self._send(END_OF_INPUT):
            await self.call.done_writing()

    async def finish(self) -> grpc.StatusCode:
        """end_input(), then the call's status once the server has ended it."""
        await self.end_input()
        return await self.ended()

    async def ended(self) -> grpc.StatusCode:
        """The conversation's status, once the server has ended its call and it was not
        continued on another (the reader has read everything)."""
        assert self._reader is not None, "the conversation is not reading"
        await asyncio.wait([self._reader])
        self._reader.result()
        assert self.code is not None
        return self.code

    async def _write(self, request: pb.ConverseRequest) -> bool:
        """The microphone's writes: True once the request is on its way (on this call, or kept
        for the call that continues the conversation), False once the conversation is over."""
        async with self._write_lock:
            if request.WhichOneof("request") == "audio":
                self._sent_audio.add(request.audio)
            call = self.call
            if await self._send(request):
                return True
        if self._reader is None:  # nobody reads how the call ended, nor continues it
            return False
        while self.call is call and not self._over:  # the reader moves the conversation, or ends it
            await self._call_changed.wait()
        return not self._over

    def _announce_call(self) -> None:
        self._call_changed.set()
        self._call_changed = asyncio.Event()

    async def _send(self, request: pb.ConverseRequest) -> bool:
        """False if the call has ended (how it ended is the reader's to report) or is draining."""
        if self.call is self._retired:
            return False
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True

    # --- output ----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                code, details = await self._read_call(self.call)
                if not await self._continue(code, details):
                    if (code, details) == CROSSED_WRITE and await self._connection_lost():
                        code, details = grpc.StatusCode.UNAVAILABLE, "the connection to the server was lost"
                    self.code, self.details = code, details
                    return
        finally:
            self._over = True
            self._announce_call()
            self.microphone.queue.drop()  # what it holds will never be sent: its turns are over
            self.assembler.end()

    async def _read_call(
        self, call: grpc.aio.StreamStreamCall[pb.ConverseRequest, pb.ConverseResponse]
    ) -> tuple[grpc.StatusCode, str]:
        try:
            async for response in call:
                self._handle(response)
                if response.WhichOneof("event") == "draining":
                    await self._retire(call)
            return await call.code(), await call.details()
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""

    async def _connection_lost(self) -> bool:
        """Whether the channel's connection is gone, or goes within CONNECTION_LOST_S. A crossed
        write hides the status of a call whose server died (UNAVAILABLE; about 1 kill in 10 while
        the microphone writes); the connection going with it says what that status was. Asked
        only of a conversation that ends: one that continues on a new call does not wait."""
        state = self._channel.get_state()
        if state is grpc.ChannelConnectivity.READY:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONNECTION_LOST_S):
                    await self._channel.wait_for_state_change(state)
            state = self._channel.get_state()
        return state is not grpc.ChannelConnectivity.READY

    async def _retire(self, call: grpc.aio.StreamStreamCall[pb.ConverseRequest, pb.ConverseResponse]) -> None:
        """The server drains `call`: writes stop going to it (they are kept for the next call)
        and it is half-closed, so that the server ends it at once with UNAVAILABLE."""
        async with self._write_lock:
            self._retired = call
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()

    def _handle(self, response: pb.ConverseResponse) -> None:
        now = time.monotonic()
        if self._move is not None:  # the first event of the call that continues the conversation
            code, details, broken_at = self._move
            self.resumptions.append(
                Resumed(code, details, broken_at, self._last_audio_at, now, self._attempts)
            )
            self._move = None
        self._attempts = 0
        kind = response.WhichOneof("event")
        if kind == "reply_audio":
            self._last_audio_at = now
        elif kind == "resumption":
            self.ticket = response.resumption
            rate = self.settings.input_format.sample_rate
            self._sent_audio.forget_before(_samples(self.ticket.audio_offset, rate))
            self._texts = [(turn, text) for turn, text in self._texts if not turn.ended]
        if self.ticket is None and kind != "session_started" and self._sent_audio.keeping:
            # The server sends its first ticket right after session_started, or none at all.
            self._sent_audio.stop_keeping()
            self._texts.clear()
        self.assembler.handle(response)

    async def _continue(self, code: grpc.StatusCode, details: str) -> bool:
        """After the call ended with `code`: True once a new call continues the conversation
        (opened with the latest ticket, the audio and typed turns it does not cover sent
        again), False when the conversation ends here."""
        ticket = self.ticket
        going_away = (
            code == grpc.StatusCode.UNAVAILABLE
            or (code, details) == CROSSED_WRITE
            or self.call is self._retired
        )
        if not going_away or ticket is None or not self._resume or self._closing:
            return False
        if self._attempts >= MAX_RESUME_ATTEMPTS:
            return False
        if self._move is None:
            self._move = (code, details, time.monotonic())
        if self._attempts:  # a call opened to continue the conversation failed at once: back off
            await asyncio.sleep(min(RESUME_MAX_WAIT_S, RESUME_FIRST_WAIT_S * 2 ** (self._attempts - 1)))
        self._attempts += 1
        try:
            async with asyncio.timeout(RESUME_CONNECT_TIMEOUT_S):
                await self._channel.channel_ready()
        except TimeoutError:
            return False
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        offset = _samples(ticket.audio_offset, self.settings.input_format.sample_rate)
        async with self._write_lock:
            self.call = self._new_call()
            self.assembler.moved(ticket.turns, ticket.audio_offset.ToNanoseconds() / 1e9)
            config = dataclasses.replace(self.settings, resumption_ticket=ticket.ticket).config()
            requests = [
                config,
                *(pb.ConverseRequest(audio=audio) for audio in self._sent_audio.since(offset)),
                *(text for _, text in self._texts),
            ]
            for request in requests:
                if not await self._send(request):
                    break
            else:
                if self._input_ended:
                    await self._end_writing()
        self._announce_call()
        return True

    # --- what was received ---------------------------------------------------------------------

    @property
    def turns(self) -> list[Turn]:
        """The turns the server started, in order."""
        return self.assembler.turns

    @property
    def transcripts(self) -> list[str]:
        return self.assembler.transcripts

    @property
    def errors(self) -> list[pb.SessionError]:
        return self.assembler.errors

    def turn(self, turn_id: str) -> Turn | None:
        return self.assembler.turn(turn_id)
