"""The Whisper stage and the stub LLM and TTS, with the orchestrator's link to Whisper through a
FaultProxy that resets it again and again: for the chaos tests that speak real recordings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tests.chaos.fault_proxy import FaultProxy
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args


@dataclass(frozen=True)
class ResetStack:
    orchestrator: ServiceProcess
    proxy: FaultProxy  # between the orchestrator and the Whisper stage, resetting every ~1 s


@asynccontextmanager
async def whisper_behind_resets(seed: int) -> AsyncIterator[ResetStack]:
    """The stack with resets running; every process and the proxy are stopped on exit."""
    started: list[ServiceProcess] = []
    proxy: FaultProxy | None = None
    try:
        for module in ("stt_whisper", "llm_stub", "tts_stub"):
            started.append(await asyncio.to_thread(ServiceProcess, module, stage_args(0, 0)))
        stt, llm, tts = started
        proxy = FaultProxy(stt.port, seed=seed)
        await proxy.start()
        targets = [f"--stt={proxy.target}", f"--llm={llm.target}", f"--tts={tts.target}"]
        orchestrator = await asyncio.to_thread(ServiceProcess, "orchestrator", stage_args(0, 0, *targets))
        started.append(orchestrator)
        await wait_until_serving(orchestrator.target, 30)
        await proxy.reset_every(1.0, jitter_s=0.3)
        yield ResetStack(orchestrator, proxy)
    finally:
        if proxy is not None:
            await proxy.close()
        for process in reversed(started):
            await asyncio.to_thread(process.stop)
