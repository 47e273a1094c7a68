"""The command-line client against a real stack: what a user running it sees, including
barge-in after each kind of turn."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stubs import audio_code
from stubs.audio_code import normalize_text
from stubs.replies import STORY
from tests.stack_fixtures import instant_stack
from voicepipe import pcm
from voicepipe.processes import PROJECT_ROOT
from voicepipe_tools.stack import LocalStack

CLI = "voicepipe_tools.client"
# The conversation's own deadline: well under the 20 s the story takes to play out.
CONVERSATION_TIMEOUT_S = 15


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    async with instant_stack() as local:
        yield local


async def run_client(stack: LocalStack, out_dir: Path, *steps: str) -> subprocess.CompletedProcess[str]:
    assert stack.orchestrator is not None
    command = [
        sys.executable,
        "-m",
        CLI,
        "--target",
        stack.orchestrator.target,
        "--out-dir",
        str(out_dir),
        "--timeout",
        str(CONVERSATION_TIMEOUT_S),
        *steps,
    ]
    return await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CONVERSATION_TIMEOUT_S + 30,
        check=False,
    )


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


@pytest.mark.parametrize("first", ["--say", "--type"])
async def test_barge_in_speaks_over_the_reply_of_any_kind_of_turn(
    stack: LocalStack, tmp_path: Path, first: str
) -> None:
    """`--barge-in` speaks over the story a second into it, whether the story was asked for by
    voice or by text: the story stops, and the barge-in is answered."""
    done = await run_client(
        stack, tmp_path, first, "Please tell me a story.", "--barge-in", "What is 2 plus 3?"
    )
    assert done.returncode == 0, done.stderr
    heard = re.search(r"^\[turn 1\] interrupted; the user heard: '(.*)'$", done.stdout, re.MULTILINE)
    assert heard is not None, done.stdout
    assert heard[1] and STORY.startswith(heard[1]) and len(heard[1]) < len(STORY) / 2, heard[1]
    assert f"[turn 2] user:  {normalize_text('What is 2 plus 3?')}" in done.stdout, done.stdout
    assert "[turn 2] agent: 2 plus 3 is 5." in done.stdout, done.stdout
    rows = {
        line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if re.match(r"^\s+\d+ ", line)
    }
    assert rows == {"1": "interrupted", "2": "completed"}, done.stdout
    # The user heard about a second of the 20 s story before speaking over it.
    assert 0.5 < wav_seconds(tmp_path / "turn-1.wav") < 5.0


async def test_a_typed_and_a_spoken_turn_print_their_text_audio_and_latency(
    stack: LocalStack, tmp_path: Path
) -> None:
    done = await run_client(stack, tmp_path, "--fast", "--type", "What is 6 times 7?", "--say", "Hello there")
    assert done.returncode == 0, done.stderr
    assert "[turn 1] user:  What is 6 times 7?" in done.stdout
    assert "[turn 1] agent: 6 times 7 is 42." in done.stdout
    assert f"[turn 2] user:  {normalize_text('Hello there')}" in done.stdout
    assert "[turn 2] agent: Hello! How can I help you today?" in done.stdout
    for turn in ("1", "2"):
        assert f"[turn {turn}] reply audio:" in done.stdout
        assert wav_seconds(tmp_path / f"turn-{turn}.wav") > 0.5
    table = done.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split()[:3] == ["turn", "outcome", "client"], table
    assert [row.split()[:2] for row in table[1:]] == [["1", "completed"], ["2", "completed"]], table


async def test_a_wav_file_is_streamed_and_answered(stack: LocalStack, tmp_path: Path) -> None:
    question = tmp_path / "question.wav"
    with wave.open(str(question), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(pcm.pcm16_to_bytes(audio_code.encode("What is 2 plus 3?", 16_000)))
    done = await run_client(stack, tmp_path, "--fast", "--wav", str(question))
    assert done.returncode == 0, done.stderr
    assert f"[turn 1] user:  {normalize_text('What is 2 plus 3?')}" in done.stdout, done.stdout
    assert "[turn 1] agent: 2 plus 3 is 5." in done.stdout, done.stdout
    assert wav_seconds(tmp_path / "turn-1.wav") > 0.5
