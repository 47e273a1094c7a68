"""One conversation: a Converse call with a microphone task sending the caller's audio and a
reader task assembling the agent's turns."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

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


@dataclass(frozen=True)
class SessionSettings:
    """What the first message of the call (SessionConfig) says."""

    input_format: PcmFormat = PCM_16K
    output_format: PcmFormat = PCM_16K
    session_id: str = ""
    system_prompt: str = ""

    def config(self) -> pb.ConverseRequest:
        return pb.ConverseRequest(
            config=pb.SessionConfig(
                input_audio_format=self.input_format.to_proto(),
                output_audio_format=self.output_format.to_proto(),
                session_id=self.session_id,
                system_prompt=self.system_prompt,
            )
        )


class Conversation:
    """One Converse call, used as `async with Conversation(...) as conversation:` (leaving the
    block cancels the call if it is still open). `assembler` builds the turns from what the
    server sends; `metadata` goes out with the call (a gateway's per-caller bearer token)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        settings: SessionSettings,
        *,
        microphone: Microphone,
        timeout_s: float | None = None,
        assembler: TurnAssembler | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.settings = settings
        self.microphone = microphone
        self.assembler = assembler or TurnAssembler(settings.output_format)
        stub: VoiceAgentServiceAsyncStub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        self.call = stub.Converse(timeout=timeout_s, metadata=metadata, wait_for_ready=True)
        self.code: grpc.StatusCode | None = None  # once the call has ended
        self.details = ""
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def open(self, *, read: bool = True) -> Conversation:
        """Sends the config and starts the microphone and (if `read`) the reader."""
        await self.call.write(self.settings.config())
        self._sender = asyncio.create_task(
            self.microphone.run(self.settings.input_format, self._write, self.assembler.expect),
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
        self.call.cancel()
        await cancel_and_wait(self._reader, self._sender)

    async def __aenter__(self) -> Conversation:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- input -----------------------------------------------------------------------------

    def say(self, utterance: Utterance) -> Turn:
        """Queues `utterance` for the microphone; returns the turn it will start (started once
        the server says so: see Turn's events)."""
        turn = Turn()
        self.microphone.queue.put(Speech(utterance, turn))
        return turn

    async def speak(self, utterance: Utterance) -> Turn:
        """say(), returning once every frame of `utterance` has left."""
        turn = Turn()
        speech = Speech(utterance, turn)
        self.microphone.queue.put(speech)
        await speech.sent.wait()
        return turn

    def play(self, utterance: Utterance) -> Speech:
        """Queues audio that starts no turn the caller waits for (a recording, silence)."""
        speech = Speech(utterance)
        self.microphone.queue.put(speech)
        return speech

    async def send_audio(self, audio: bytes) -> bool:
        """Sends caller audio now, beside the microphone (audio relayed from a live source);
        False once the call has ended."""
        return await self._write(pb.ConverseRequest(audio=audio))

    async def type(self, text: str) -> Turn:
        """Sends a text turn now; returns the turn it starts."""
        async with self._write_lock:
            turn = Turn(speech_ended_at=time.monotonic())
            self.assembler.expect(turn)
            await self._send(pb.ConverseRequest(text=pb.TextTurn(text=text)))
        return turn

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
            if await self._send(END_OF_INPUT):
                await self.call.done_writing()

    async def finish(self) -> grpc.StatusCode:
        """end_input(), then the call's status once the server has ended it."""
        await self.end_input()
        return await self.ended()

    async def ended(self) -> grpc.StatusCode:
        """The call's status, once the server has ended it (the reader has read everything)."""
        assert self._reader is not None, "the conversation is not reading"
        await asyncio.wait([self._reader])
        self._reader.result()
        assert self.code is not None
        return self.code

    async def _write(self, request: pb.ConverseRequest) -> bool:
        async with self._write_lock:
            return await self._send(request)

    async def _send(self, request: pb.ConverseRequest) -> bool:
        """False if the call has ended: how it ended is the reader's to report."""
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True

    # --- output ----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.assembler.handle(response)
            self.code, self.details = await self.call.code(), await self.call.details()
        except grpc.aio.AioRpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        finally:
            self.assembler.end()

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
