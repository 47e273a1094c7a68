"""Room noise as a caller's microphone picks it up between answers, made here (seeded), for the
tests that no noise starts an utterance or a turn."""

from __future__ import annotations

import numpy as np

from voicepipe.pcm import Samples

RATE = 16_000


def room_noises() -> list[Samples]:
    """Noises a microphone picks up between answers: hiss, rumble, clicks, breaths."""
    rng = np.random.default_rng(5)
    hiss = rng.normal(0, 1000, 3 * RATE)
    rumble = np.cumsum(rng.normal(0, 1, 3 * RATE))
    rumble -= np.convolve(rumble, np.ones(800) / 800, "same")  # no DC drift
    rumble *= 2000 / rumble.std()
    clicks = np.zeros(3 * RATE)
    for at in rng.integers(0, 3 * RATE - 200, 24):
        clicks[at : at + 200] += rng.normal(0, 6000, 200) * np.hanning(200)
    spectrum = np.fft.rfft(rng.normal(0, 1, 4 * RATE))
    hertz = np.fft.rfftfreq(4 * RATE, 1 / RATE)
    spectrum[(hertz < 300) | (hertz > 3000)] = 0  # breath: band-limited, in half-second puffs
    breath = np.fft.irfft(spectrum, 4 * RATE)
    breath *= 2500 / breath.std() * np.tile(np.concatenate([np.hanning(RATE // 2), np.zeros(RATE // 2)]), 4)
    return [noise.clip(-32000, 32000).astype(np.int16) for noise in (hiss, rumble, clicks, breath)]
