"""The page in a real browser (Debian's chromium, headless, driven by playwright) against the
gateway and the stub stack. The fake microphone plays a WAV: three seconds of silence, then
"What is 2 plus 3?" in the stub audio code, then silence. chromium's echo cancellation, noise
suppression and gain control process it on the way in, so these tests assert on what the page
shows and counts, not on samples."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from playwright.async_api import Browser, Page

from stubs import audio_code
from stubs.replies import STORY
from tests.gateway_fixtures import chromium, gateway, page_url, write_wav
from tests.stack_fixtures import instant_stack, own_orchestrator, processes
from voicepipe.processes import ServiceProcess
from voicepipe_tools.stack import LocalStack

RATE = 16_000
PHRASE = audio_code.render("What is 2 plus 3?", RATE).samples
# The phrase starts this far into the microphone's recording (after the page has connected).
SPEECH_AT_S = 3.0
# The microphone's 20 ms frames by which the phrase and the silence that ends it have been captured.
PHRASE_OVER_FRAMES = round((SPEECH_AT_S + len(PHRASE) / RATE + 0.5) / 0.02)
WAIT_MS = 15_000


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    # The LLM writes 20 tokens per second: the story plays long enough to be spoken over.
    async with instant_stack(stage_flags={"llm": ["--tokens-per-second", "20"]}) as stack:
        yield stack


@pytest.fixture(scope="module")
async def gateway_process(stack: LocalStack) -> AsyncIterator[ServiceProcess]:
    assert stack.orchestrator is not None
    async with gateway(stack.orchestrator.target) as process:
        yield process


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    samples = np.concatenate(
        [np.zeros(int(SPEECH_AT_S * RATE), np.int16), PHRASE, np.zeros(6 * RATE, np.int16)]
    )
    microphone = write_wav(tmp_path_factory.mktemp("microphone") / "speech.wav", samples, RATE)
    async with chromium(microphone) as browser:
        yield browser


async def open_page(browser: Browser, url: str, *, push_to_talk: bool) -> Page:
    """The page, started (microphone on, connected); in push-to-talk mode the microphone's
    speech is not sent while the button is up."""
    page = await browser.new_page()
    await page.goto(url)
    if push_to_talk:
        await page.check("#ptt-mode")
    await page.click("#start")
    await page.wait_for_function("window.voicepipe.stats.sessions >= 1", timeout=WAIT_MS)
    await page.wait_for_selector('#status[data-state="listening"]', timeout=WAIT_MS)
    return page


async def type_turn(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def stats(page: Page) -> dict[str, float]:
    result: dict[str, float] = await page.evaluate("({...window.voicepipe.stats})")
    return result


async def test_a_typed_turn_is_answered_and_its_reply_plays_with_a_latency_waterfall(
    browser: Browser, gateway_process: ServiceProcess
) -> None:
    page = await open_page(browser, page_url(gateway_process), push_to_talk=True)
    try:
        # Once the microphone has played its phrase (silence went out instead: the button is up)...
        await page.wait_for_function(
            f"window.voicepipe.stats.micFrames >= {PHRASE_OVER_FRAMES}", timeout=WAIT_MS
        )
        await type_turn(page, "What is 2 plus 3?")
        await page.wait_for_selector("#log li.agent >> text=2 plus 3 is 5.", timeout=WAIT_MS)
        # The reply plays to its end: every sample received is played, and they are as many
        # as the server said the reply lasts.
        await page.wait_for_function(
            "(s => s.completed === 1 && !s.playing && s.played > 0 && s.played === s.received)"
            "(window.voicepipe.stats)",
            timeout=WAIT_MS,
        )
        played = await stats(page)
        rate = await page.evaluate("window.voicepipe.sampleRate")
        assert played["received"] == pytest.approx(played["replyMs"] * rate / 1000, abs=rate * 0.002)
        row = page.locator("#waterfall li")
        await row.first.wait_for(timeout=WAIT_MS)
        assert await row.count() == 1
        assert "first audio after" in await row.first.inner_text()
        # STT, LLM, TTS and the orchestrator's part fill the bar: they sum to the total.
        widths = await row.first.locator(".bar span").evaluate_all(
            "parts => parts.map(part => parseFloat(part.style.width))"
        )
        assert len(widths) == 4 and sum(widths) == pytest.approx(100, abs=0.5), widths
        # Push to talk: the microphone's phrase, captured before the typed turn, was never sent.
        assert await page.locator("#log li.user").all_inner_texts() == ["You (typed)What is 2 plus 3?"]
        assert await page.locator("#error").is_hidden()
    finally:
        await page.close()


async def test_push_to_talk_sends_the_microphone_while_the_button_is_held(
    browser: Browser, gateway_process: ServiceProcess
) -> None:
    page = await open_page(browser, page_url(gateway_process), push_to_talk=True)
    try:
        await page.hover("#ptt")
        await page.mouse.down()
        # The phrase the microphone plays meanwhile is heard and answered.
        await page.wait_for_selector("#log li.agent", timeout=WAIT_MS)
        await page.mouse.up()
        spoken = await page.locator("#log li.user .who").all_inner_texts()
        assert spoken == ["You"], spoken
    finally:
        await page.close()


async def test_speaking_over_the_reply_stops_playback_at_once(
    browser: Browser, gateway_process: ServiceProcess
) -> None:
    page = await open_page(browser, page_url(gateway_process), push_to_talk=False)
    try:
        await type_turn(page, "Please tell me a story.")
        await page.wait_for_function("window.voicepipe.stats.interrupted === 1", timeout=WAIT_MS)
        interrupted = page.locator("#log li.agent.interrupted")
        heard = await interrupted.locator(".text").inner_text()
        assert heard and STORY.startswith(heard) and len(heard) < len(STORY), heard
        # The spoken phrase gets its own turn; once its reply has played, the page has played
        # of the story only what it had played when the interruption came: whatever of the
        # story was still buffered was dropped, and nothing of it played afterwards.
        await page.wait_for_function(
            "(s => s.completed === 1 && !s.playing && s.received > s.receivedAtFlush)"
            "(window.voicepipe.stats)",
            timeout=WAIT_MS,
        )
        await page.wait_for_function(
            "(s => s.played - s.playedAtFlush === s.received - s.receivedAtFlush)(window.voicepipe.stats)",
            timeout=WAIT_MS,
        )
        counted = await stats(page)
        assert counted["flushed"] > 0, counted
        assert counted["playedAtFlush"] + counted["flushed"] == counted["receivedAtFlush"], counted
    finally:
        await page.close()


async def test_push_to_talk_over_the_reply_interrupts_it_at_once(
    browser: Browser, gateway_process: ServiceProcess
) -> None:
    """Pressing the button while the agent speaks sends `barge_in`: playback stops at the press,
    the reply ends interrupted, and none of its audio plays afterwards."""
    page = await open_page(browser, page_url(gateway_process), push_to_talk=True)
    try:
        # Once the microphone has played its phrase (not sent: the button is up)...
        await page.wait_for_function(
            f"window.voicepipe.stats.micFrames >= {PHRASE_OVER_FRAMES}", timeout=WAIT_MS
        )
        await type_turn(page, "Please tell me a story.")
        # ...half a second into the story, the caller presses the button.
        await page.wait_for_function(
            "(s => s.playing && s.played > window.voicepipe.sampleRate / 2)(window.voicepipe.stats)",
            timeout=WAIT_MS,
        )
        await page.hover("#ptt")
        await page.mouse.down()
        await page.wait_for_function("window.voicepipe.stats.interrupted === 1", timeout=WAIT_MS)
        heard = await page.locator("#log li.agent.interrupted .text").inner_text()
        await page.wait_for_function("!window.voicepipe.stats.playing", timeout=WAIT_MS)
        await page.mouse.up()
        counted = await stats(page)
    finally:
        await page.close()
    assert heard and STORY.startswith(heard) and len(heard) < len(STORY), heard
    assert counted["bargeIns"] == 1 and counted["completed"] == 0, counted
    # What was buffered at the press was dropped, and nothing of the story played after it.
    assert counted["flushed"] > 0, counted
    assert counted["played"] == counted["playedAtFlush"], counted
    assert counted["playedAtFlush"] + counted["flushed"] == counted["receivedAtFlush"], counted


async def test_killing_the_orchestrator_shows_the_error_and_the_page_reconnects(
    browser: Browser, stack: LocalStack
) -> None:
    async with processes() as group:
        orchestrator = await own_orchestrator(group, stack)
        async with gateway(orchestrator.target, "--connect-timeout=1") as process:
            page = await open_page(browser, page_url(process), push_to_talk=True)
            try:
                await asyncio.to_thread(orchestrator.kill)
                error = page.locator("#error")
                await page.wait_for_selector("#error >> text=code 4014", timeout=WAIT_MS)
                assert "Disconnected" in await error.inner_text()
                await page.wait_for_selector('#status[data-state="reconnecting"]', timeout=WAIT_MS)
                # Back up on the same port: the page reconnects by itself and talks again.
                await own_orchestrator(group, stack, port=orchestrator.port)
                await page.wait_for_function("window.voicepipe.stats.sessions >= 2", timeout=WAIT_MS)
                await page.wait_for_selector('#status[data-state="listening"]', timeout=WAIT_MS)
                assert await error.is_hidden()
                await type_turn(page, "What is 2 plus 3?")
                await page.wait_for_selector("#log li.agent >> text=2 plus 3 is 5.", timeout=WAIT_MS)
            finally:
                await page.close()
