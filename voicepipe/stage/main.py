"""`python -m <package>` for any engine: the common server flags, the engine's own flags, the
process bootstrap, and the server that hosts the engine behind its contract.

    SPEC = StageSpec(MyEngine, module="my_stt", role="stt", description="...")
    if __name__ == "__main__":
        SPEC.run()
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from voice.v1 import language_model_pb2_grpc, speech_to_text_pb2_grpc, text_to_speech_pb2_grpc
from voicepipe.aio import cancel_and_wait
from voicepipe.config import FlagParser
from voicepipe.engines import PORTS
from voicepipe.server import GrpcService, Registration, wait_for_shutdown_signal
from voicepipe.server import run as run_process
from voicepipe.settings import ServerSettings
from voicepipe.stage import Engine, llm, stt, tts
from voicepipe.stage.protocol import SessionLimit

log = logging.getLogger(__name__)


class ServerExtension(Protocol):
    """Something given to a server from outside its engine, such as the stubs' fault knobs:
    flags of its own and the interceptors they ask for."""

    def add_flags(self, flags: FlagParser) -> None: ...

    def interceptors(self, args: argparse.Namespace) -> list[grpc.aio.ServerInterceptor]: ...


def registration(engine: Engine, sessions: SessionLimit) -> Registration:
    """The contract an engine serves, chosen by its kind."""
    if isinstance(engine, stt.SpeechEngine):
        return Registration(
            full_name=stt.SERVICE_NAME,
            add_to_server=speech_to_text_pb2_grpc.add_SpeechToTextServiceServicer_to_server,
            servicer=stt.SpeechToTextServicer(engine, sessions),
        )
    if isinstance(engine, llm.LanguageEngine):
        return Registration(
            full_name=llm.SERVICE_NAME,
            add_to_server=language_model_pb2_grpc.add_LanguageModelServiceServicer_to_server,
            servicer=llm.LanguageModelServicer(engine, sessions),
        )
    if isinstance(engine, tts.VoiceEngine):
        return Registration(
            full_name=tts.SERVICE_NAME,
            add_to_server=text_to_speech_pb2_grpc.add_TextToSpeechServiceServicer_to_server,
            servicer=tts.TextToSpeechServicer(engine, sessions),
        )
    raise TypeError(f"{type(engine).__name__} is not a SpeechEngine, LanguageEngine or VoiceEngine")


@dataclass(frozen=True)
class StageSpec:
    """What `python -m <module>` serves: an engine type in a role ("stt", "llm" or "tts": the
    ports and the VOICEPIPE_<ROLE>_<FLAG> variables), with extensions given from outside."""

    engine: type[Engine]
    module: str
    role: str
    description: str
    extensions: Sequence[ServerExtension] = ()

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        ports = PORTS[self.role]  # an engine listens where its role does
        flags = FlagParser(self.role, self.description, module=self.module)
        ServerSettings.add_flags(flags, port=ports.port, metrics_port=ports.metrics_port)
        flags.add(
            "--max-sessions",
            type=int,
            default=0,
            help="concurrent calls this process accepts before answering RESOURCE_EXHAUSTED (0: no limit)",
        )
        self.engine.add_flags(flags)
        for extension in self.extensions:
            extension.add_flags(flags)
        return flags.parse(argv)

    def run(self, argv: list[str] | None = None) -> None:
        """The whole process: flags, logging, the event loop, the server."""
        args = self.parse_args(argv)
        settings = ServerSettings.from_args(args)
        interceptors = [i for extension in self.extensions for i in extension.interceptors(args)]

        async def main() -> None:
            # Built inside the running loop: grpc.aio binds a server to the loop it was created in.
            engine = self.engine.from_args(args)
            await serve(engine, settings, SessionLimit(args.max_sessions), self.module, interceptors)

        run_process(main(), self.module, settings)


async def serve(
    engine: Engine,
    settings: ServerSettings,
    sessions: SessionLimit,
    name: str,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Starts the engine, serves it until SIGTERM/SIGINT, then shuts down gracefully; the
    server's health follows the engine's (its first status before the "ready" line)."""
    await engine.start()
    service = GrpcService(name, settings, [registration(engine, sessions)], interceptors)
    statuses = engine.health()
    health: asyncio.Task[None] | None = None
    try:
        await service.start(serving=await anext(statuses, True))
        health = asyncio.create_task(follow_health(statuses, service), name=f"{name}-engine-health")
        await wait_for_shutdown_signal()
    finally:
        await cancel_and_wait(health)
        await statuses.aclose()
        await service.stop()
        await engine.close()


async def follow_health(statuses: AsyncIterator[bool], service: GrpcService) -> None:
    async for serving in statuses:
        log.info("engine health changed", extra={"serving": serving})
        await service.set_serving(serving)
