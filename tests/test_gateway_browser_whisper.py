"""The page hears a real recording: chromium's fake microphone plays a person saying "go forward
ten meters" (pocketsphinx-testdata), the page resamples and sends it through the gateway, the
Whisper stage transcribes it, and the page shows the right transcript and the agent's answer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Browser

from tests.gateway_fixtures import chromium, gateway, page_url, write_wav
from voicepipe_tools.stack import LocalStack, start_stack

RECORDING = Path("/usr/share/pocketsphinx/test/data/goforward.raw")  # 16 kHz mono PCM16
RATE = 16_000
WAIT_MS = 60_000


def words(text: str) -> str:
    """Lower case, no punctuation, numbers as words (Whisper writes "10" or "ten")."""
    spoken = re.sub(r"[^a-z0-9' ]", " ", text.lower()).replace("10", "ten")
    return " ".join(spoken.split())


@pytest.fixture(scope="module")
async def whisper_stack() -> AsyncIterator[LocalStack]:
    stack = await start_stack(
        "instant", ephemeral=True, engines={"stt": "whisper", "llm": "stub", "tts": "stub"}
    )
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def microphone_wav(directory: Path) -> Path:
    """The recording between a second of silence before and two after (the end of speech)."""
    speech = np.frombuffer(RECORDING.read_bytes(), "<i2")
    silence = np.zeros(RATE, np.int16)
    return write_wav(directory / "goforward.wav", np.concatenate([silence, speech, silence, silence]), RATE)


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    microphone = await asyncio.to_thread(microphone_wav, tmp_path_factory.mktemp("microphone"))
    async with chromium(microphone) as browser:
        yield browser


async def test_the_page_hears_a_real_recording(browser: Browser, whisper_stack: LocalStack) -> None:
    assert whisper_stack.orchestrator is not None
    async with gateway(whisper_stack.orchestrator.target) as process:
        page = await browser.new_page()
        try:
            await page.goto(page_url(process))
            await page.click("#start")
            user = page.locator("#log li.user .text")
            await user.first.wait_for(timeout=WAIT_MS)
            assert words(await user.first.inner_text()) == "go forward ten meters"
            # The stub LLM repeats what it heard; its reply plays.
            await page.wait_for_function(
                "(s => s.completed >= 1 && s.played > 0)(window.voicepipe.stats)", timeout=WAIT_MS
            )
            agent = await page.locator("#log li.agent .text").first.inner_text()
            assert words(agent).endswith("go forward ten meters"), agent
        finally:
            await page.close()
