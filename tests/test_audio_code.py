"""Tests of the stub audio code (stubs.audio_code): exact round trips under every transport
condition the system allows, chunk independence, event order and offsets, G.711 mu-law."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from stubs import audio_code as ac

RATES = [8000, 11025, 16000, 22050, 44100, 48000]
TEXTS = [
    "hello",
    "aa  bb",
    "1+1=2?",
    "Hello, World!",
    "UPPER lower MiXeD 0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "x",
    "a b c d e f",
    "zzzzzzzz",
]
PARAGRAPH = (
    "It was the best of times, it was the worst of times; it was the age of wisdom (and of "
    "foolishness), the epoch of belief #1 & incredulity #2 -- 100% of the season of Light & "
    "Darkness. We had all before us, we had nothing before us: were we all going direct "
    'to Heaven? [sic] {ok} <tag> a=b+c*d/e ~x^y|z `code` "q" $9.99'
)
Events = list[ac.DecoderEvent]
Int16Array = npt.NDArray[np.int16]


def decode_events(
    samples: Int16Array, rate: int, chunks: Iterable[int] | None = None, **kwargs: int
) -> Events:
    """All events of a stream fed in the given chunk sizes (one chunk if None), then finish()."""
    decoder = ac.SpeechDecoder(rate, **kwargs)
    events: Events = []
    if chunks is None:
        events += decoder.feed(samples)
    else:
        pos = 0
        for size in chunks:
            events += decoder.feed(samples[pos : pos + size])
            pos += size
        assert pos >= samples.size
    events += decoder.finish()
    assert decoder.samples_consumed == samples.size
    return events


def fixed_chunks(total: int, size: int) -> list[int]:
    return [size] * (-(-total // size))


def random_chunks(total: int, rng: np.random.Generator, max_size: int) -> list[int]:
    sizes = rng.integers(1, max_size + 1, size=total // ((max_size + 1) // 2) + 16).tolist()
    while sum(sizes) < total:
        sizes += rng.integers(1, max_size + 1, size=16).tolist()
    return [int(size) for size in sizes]


def finals(events: Events) -> list[str]:
    return [e.text for e in events if isinstance(e, ac.UtteranceEnded)]


def check_structure(events: Events, texts: Sequence[str]) -> None:
    """Per utterance: SpeechStarted, one WordDecoded per word (growing text), UtteranceEnded;
    stream positions never go backwards."""
    pos = 0
    for text in texts:
        words = ac.normalize_text(text).split(" ")
        started = events.pop(0)
        assert isinstance(started, ac.SpeechStarted)
        assert started.offset_samples >= pos
        pos = started.offset_samples
        for k, word in enumerate(words):
            event = events.pop(0)
            assert isinstance(event, ac.WordDecoded), event
            assert event.word == word
            assert event.text_so_far == " ".join(words[: k + 1])
            assert event.start_samples == started.offset_samples
            assert pos <= event.word_start_samples < event.end_samples
            pos = event.end_samples
        ended = events.pop(0)
        assert isinstance(ended, ac.UtteranceEnded), ended
        assert ended.text == " ".join(words)
        assert ended.start_samples == started.offset_samples
        assert ended.end_samples == pos <= ended.detected_at_samples
        pos = ended.detected_at_samples
    assert events == []


def expected_bursts(text: str, start_ms: float = 0.0) -> list[list[tuple[float, float]]]:
    """(start_ms, end_ms) of every tone burst, per word, computed from the documented timings."""
    words: list[list[tuple[float, float]]] = []
    t = start_ms
    for word in ac.normalize_text(text).split(" "):
        if words:
            t += 60 - 10  # a word gap replaces the inter-character silence
        bursts = []
        for _ in word:
            bursts.append((t, t + 30.0))
            t += 30 + 10
        words.append(bursts)
    return words


def add_noise(samples: Int16Array, dbfs: float, seed: int) -> Int16Array:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 32768.0 * 10 ** (dbfs / 20), samples.size)
    return np.clip(np.rint(samples + noise), -32768, 32767).astype(np.int16)


def apply_gain(samples: Int16Array, db: float) -> Int16Array:
    scaled = np.rint(samples.astype(np.float64) * 10 ** (db / 20))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


# --- text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("hello", "hello"),
        ("  aa  \t\n bb  ", "aa bb"),
        ("héllo wörld ☃", "h?llo w?rld ?"),
        ("tab\tsep\u00a0nbsp", "tab sep nbsp"),
        ("ctl\x00\x7f", "ctl??"),
        ("", ""),
        (" \n\t ", ""),
        ("1+1=2?", "1+1=2?"),
    ],
)
def test_normalize_text(raw: str, normal: str) -> None:
    assert ac.normalize_text(raw) == normal


def test_unsupported_characters_decode_as_question_mark() -> None:
    samples = ac.encode("naïve café — 日本 ok", 16000)
    assert ac.decode_utterances(samples, 16000) == ["na?ve caf? ? ?? ok"]


def test_symbol_frequencies_are_documented_ones() -> None:
    assert tuple(range(350, 1251, 100)) == ac.GROUP_A_HZ
    assert tuple(range(1500, 2851, 150)) == ac.GROUP_B_HZ
    assert max(ac.GROUP_A_HZ + ac.GROUP_B_HZ) < 3400
    rate = 48000
    samples = ac.encode("a", rate, trailing_silence_ms=0).astype(np.float64)
    assert samples.size == 30 * rate // 1000
    spectrum = np.abs(np.fft.rfft(samples, n=rate))  # 1 Hz bins
    index = ord("a") - 33
    assert int(np.argmax(spectrum[:1400])) == 350 + 100 * (index // 10) == 950
    assert 1400 + int(np.argmax(spectrum[1400:])) == 1500 + 150 * (index % 10) == 2100
    assert np.abs(samples).max() <= 0.5 * 32767 + 1


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
def test_round_trip_all_rates(rate: int) -> None:
    for text in [*TEXTS, PARAGRAPH]:
        events = decode_events(ac.encode(text, rate), rate)
        assert finals(events) == [ac.normalize_text(text)]
        check_structure(events, [text])


def test_round_trip_arbitrary_rates() -> None:
    rng = np.random.default_rng(7)
    rates = [8001, 47999, *(int(r) for r in rng.integers(8000, 48001, 6))]
    text = "Any rate: 8000..48000 Hz, e.g. 12345!"
    for rate in rates:
        assert ac.decode_utterances(ac.encode(text, rate), rate) == [text], rate


def test_every_symbol_round_trips() -> None:
    alphabet = "".join(chr(c) for c in range(0x21, 0x7F))
    text = " ".join(alphabet[i : i + 9] for i in range(0, len(alphabet), 9))
    for rate in (8000, 44100):
        assert ac.decode_utterances(ac.encode(text, rate), rate) == [text]


def test_paragraph_is_long() -> None:
    assert 280 <= len(PARAGRAPH) <= 320


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_frame_alignment_does_not_matter(rate: int) -> None:
    """Speech starting at any sample offset relative to the 2.5 ms frame grid."""
    text = "aa  bb 1+1=2?"
    speech = ac.encode(text, rate)
    for shift in range(0, ac.frame_samples(rate), max(1, ac.frame_samples(rate) // 7)):
        samples = np.concatenate((np.zeros(shift + 77, dtype=np.int16), speech))
        assert ac.decode_utterances(samples, rate) == [ac.normalize_text(text)], shift


# --- chunk independence ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 48000])
def test_chunking_never_changes_events(rate: int) -> None:
    texts = ["hello", "aa  bb", "1+1=2?", PARAGRAPH[:120]]
    samples = np.concatenate([ac.encode(t, rate) for t in texts])
    reference = decode_events(samples, rate)
    check_structure(list(reference), texts)
    sizes = {
        "10ms": rate // 100,
        "20ms": rate // 50,
        "37ms": rate * 37 // 1000,
        "1s": rate,
        "frame": ac.frame_samples(rate),
        "frame+1": ac.frame_samples(rate) + 1,
    }
    for name, size in sizes.items():
        assert decode_events(samples, rate, fixed_chunks(samples.size, size)) == reference, name
    rng = np.random.default_rng(rate)
    for max_size in (3, 500, rate * 2):
        chunks = random_chunks(samples.size, rng, max_size)
        assert decode_events(samples, rate, chunks) == reference, max_size


@pytest.mark.parametrize("rate", [8000, 16000, 22050])
def test_one_sample_chunks(rate: int) -> None:
    texts = ["hello", "aa  bb", "1+1=2?"]
    samples = np.concatenate([ac.encode(t, rate) for t in texts])
    reference = decode_events(samples, rate)
    assert finals(reference) == [ac.normalize_text(t) for t in texts]
    assert decode_events(samples, rate, fixed_chunks(samples.size, 1)) == reference


def test_chunking_with_noise_gain_and_mulaw() -> None:
    rate = 8000
    text = PARAGRAPH[:150]
    samples = ac.mulaw_decode(ac.mulaw_encode(add_noise(ac.encode(text, rate, gain=0.2), -50, seed=3)))
    reference = decode_events(samples, rate)
    assert finals(reference) == [ac.normalize_text(text)]
    rng = np.random.default_rng(11)
    for _ in range(5):
        chunks = random_chunks(samples.size, rng, 400)
        assert decode_events(samples, rate, chunks) == reference


# --- transport conditions ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 48000])
@pytest.mark.parametrize("gain_db", [-20.0, -12.0, 0.0, 3.0, 6.0])
def test_gain(rate: int, gain_db: float) -> None:
    text = "Gain: " + TEXTS[5]
    via_encoder = ac.encode(text, rate, gain=ac.gain_from_db(gain_db))
    after_encoding = apply_gain(ac.encode(text, rate), gain_db)
    for samples in (via_encoder, after_encoding):
        assert ac.decode_utterances(samples, rate) == [ac.normalize_text(text)]


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
@pytest.mark.parametrize("gain_db", [6.0, 12.0])
def test_clipping(rate: int, gain_db: float) -> None:
    """The signal peaks at 0.5 of full scale, so +6 dB reaches full scale and +12 dB clips hard."""
    text = "Clipped: " + TEXTS[4]
    samples = apply_gain(ac.encode(text, rate, gain=ac.gain_from_db(6.0)), gain_db - 6.0)
    peak = int(np.abs(samples.astype(np.int32)).max())
    assert peak >= 32000
    if gain_db > 6:
        assert np.count_nonzero(np.abs(samples.astype(np.int32)) >= 32767) > samples.size // 20
    assert ac.decode_utterances(samples, rate) == [ac.normalize_text(text)]


@pytest.mark.parametrize("rate", RATES)
def test_white_noise_at_minus_50_dbfs(rate: int) -> None:
    text = "Noisy: " + TEXTS[3] + " " + TEXTS[4]
    for gain_db, seed in [(0.0, 1), (-20.0, 2), (6.0, 3)]:
        samples = add_noise(ac.encode(text, rate, gain=ac.gain_from_db(gain_db)), -50.0, seed)
        events = decode_events(samples, rate)
        assert finals(events) == [ac.normalize_text(text)], gain_db
        check_structure(events, [text])


@pytest.mark.parametrize("rate", RATES)
def test_mulaw_transport(rate: int) -> None:
    for text in [*TEXTS, PARAGRAPH]:
        for gain_db in (-20.0, 0.0, 6.0):
            sent = ac.encode(text, rate, gain=ac.gain_from_db(gain_db))
            received = ac.mulaw_decode(ac.mulaw_encode(sent))
            assert ac.decode_utterances(received, rate) == [ac.normalize_text(text)], (text, gain_db)


def test_linear16_bytes_round_trip() -> None:
    samples = ac.encode("wire", 16000)
    data = ac.pcm16_to_bytes(samples)
    assert len(data) == 2 * samples.size
    decoded = ac.bytes_to_pcm16(data)
    assert decoded.dtype == np.int16
    assert np.array_equal(decoded, samples)
    assert ac.pcm16_to_bytes(np.array([1, -2, 256, -32768], dtype=np.int16)) == bytes.fromhex(
        "0100feff00010080"
    )
    assert ac.bytes_to_pcm16(bytes.fromhex("0100feff00010080")).tolist() == [1, -2, 256, -32768]
    with pytest.raises(ValueError):
        ac.bytes_to_pcm16(b"\x00\x01\x02")


# --- G.711 mu-law ------------------------------------------------------------------------------


def reference_ulaw_encode(sample: int) -> int:
    """Scalar port of the classic Sun g711.c linear2ulaw (16-bit input, BIAS 0x84, CLIP 32635)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, 32635) + 0x84
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not magnitude & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def reference_ulaw_decode(code: int) -> int:
    code = ~code & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return -magnitude if code & 0x80 else magnitude


def test_mulaw_known_values() -> None:
    pairs = {0: 0xFF, -1: 0x7F, 1: 0xFF, 32767: 0x80, -32768: 0x00, 1000: 0xCE, -1000: 0x4E}
    values = np.array(list(pairs), dtype=np.int16)
    assert ac.mulaw_encode(values) == bytes(pairs.values())
    decoded = ac.mulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00, 0xCE, 0x4E, 0xEF]))
    assert decoded.dtype == np.int16
    assert decoded.tolist() == [0, 0, 32124, -32124, 988, -988, 132]


def test_mulaw_matches_reference_for_every_value() -> None:
    every = np.arange(-32768, 32768, dtype=np.int32)
    expected = bytes(reference_ulaw_encode(int(x)) for x in every)
    assert ac.mulaw_encode(every.astype(np.int16)) == expected
    codes = bytes(range(256))
    assert ac.mulaw_decode(codes).tolist() == [reference_ulaw_decode(c) for c in codes]


def test_mulaw_round_trip_error_is_quantisation_error() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    codes = np.frombuffer(ac.mulaw_encode(every), dtype=np.uint8)
    restored = ac.mulaw_decode(codes.tobytes()).astype(np.int32)
    error = np.abs(restored - every.astype(np.int32))
    exponent = ((~codes.astype(np.int32)) >> 4) & 0x07
    half_step = 1 << (exponent + 2)  # segment e has steps of 2 ** (e + 3)
    inside = np.abs(every.astype(np.int32)) <= 32635
    assert np.all(error[inside] <= half_step[inside])
    assert error.max() <= 644  # values beyond the G.711 clip level (32635) saturate at 32124
    # Encoding is idempotent on decoded values.
    assert ac.mulaw_encode(ac.mulaw_decode(bytes(range(256)))) == bytes(
        c if c not in (0x7F,) else 0xFF for c in range(256)
    )


# --- events and offsets ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("condition", ["clean", "quiet", "loud+mulaw"])
def test_offsets_match_the_rendering(rate: int, condition: str) -> None:
    """Back-to-back utterances in one stream, each with its own events; every offset is within
    5 ms of where the documented timings put the speech."""
    texts = ["hello world", "aa  bb", "1+1=2?", "The end."]
    lead_ms = 37
    parts = [np.zeros(lead_ms * rate // 1000, dtype=np.int16)]
    starts_ms: list[float] = []
    at_ms = lead_ms * rate // 1000 * 1000 / rate
    for text in texts:
        speech = ac.encode(text, rate)
        starts_ms.append(at_ms)
        at_ms += speech.size * 1000 / rate
        parts.append(speech)
    samples = np.concatenate(parts)
    if condition == "quiet":
        samples = add_noise(apply_gain(samples, -20.0), -50.0, seed=rate)
    elif condition == "loud+mulaw":
        samples = ac.mulaw_decode(ac.mulaw_encode(apply_gain(samples, 6.0)))
    events = decode_events(samples, rate, fixed_chunks(samples.size, rate // 50))
    check_structure(list(events), texts)

    def ms(offset: int) -> float:
        return ac.samples_to_ms(offset, rate)

    tolerance = 5.0
    eou_frames = -(-120 * rate // (1000 * ac.frame_samples(rate)))
    for text, start_ms in zip(texts, starts_ms, strict=True):
        words = expected_bursts(text, start_ms)
        started = events.pop(0)
        assert isinstance(started, ac.SpeechStarted)
        assert abs(ms(started.offset_samples) - words[0][0][0]) <= tolerance
        for bursts in words:
            word = events.pop(0)
            assert isinstance(word, ac.WordDecoded)
            assert abs(ms(word.word_start_samples) - bursts[0][0]) <= tolerance
            assert abs(ms(word.end_samples) - bursts[-1][1]) <= tolerance
        ended = events.pop(0)
        assert isinstance(ended, ac.UtteranceEnded)
        assert abs(ms(ended.start_samples) - words[0][0][0]) <= tolerance
        assert abs(ms(ended.end_samples) - words[-1][-1][1]) <= tolerance
        # Detected exactly when 120 ms (rounded up to whole frames) of silence had passed.
        assert ended.detected_at_samples - ended.end_samples == eou_frames * ac.frame_samples(rate)
        assert 120.0 <= ms(ended.detected_at_samples - ended.end_samples) < 122.6


def test_speech_started_comes_first_and_promptly() -> None:
    rate = 16000
    samples = ac.encode("hello world", rate)
    decoder = ac.SpeechDecoder(rate)
    seen: Events = []
    position = 0
    first_seen_at: dict[type, int] = {}
    for size in fixed_chunks(samples.size, 80):  # 5 ms
        for event in decoder.feed(samples[position : position + size]):
            first_seen_at.setdefault(type(event), position + size)
            seen.append(event)
        position += size
    seen += decoder.finish()
    assert isinstance(seen[0], ac.SpeechStarted)
    # 20 ms of voiced frames are needed: seen within the first 30 ms burst.
    assert first_seen_at[ac.SpeechStarted] <= 30 * rate // 1000
    # "hello" ends at 190 ms; its word boundary is known 35 ms later, long before the utterance ends.
    assert 190 + 35 - 2.5 <= ac.samples_to_ms(first_seen_at[ac.WordDecoded], rate) <= 190 + 35 + 5 + 2.5
    assert first_seen_at[ac.UtteranceEnded] > first_seen_at[ac.WordDecoded] + 70 * rate // 1000
    check_structure(seen, ["hello world"])


def test_interim_words_before_the_end_of_utterance() -> None:
    rate = 8000
    rendered = ac.render("one two three", rate)
    decoder = ac.SpeechDecoder(rate)
    two_end = int(rendered.char_end_samples[len("one two") - 1])
    events = decoder.feed(rendered.samples[: two_end + 40 * rate // 1000])
    assert [type(e) for e in events] == [ac.SpeechStarted, ac.WordDecoded, ac.WordDecoded]
    assert [e.text_so_far for e in events if isinstance(e, ac.WordDecoded)] == ["one", "one two"]
    rest = decoder.feed(rendered.samples[two_end + 40 * rate // 1000 :]) + decoder.finish()
    assert [type(e) for e in rest] == [ac.WordDecoded, ac.UtteranceEnded]
    assert finals(rest) == ["one two three"]


def test_long_speech_start_holds_words_back_and_drops_short_noise() -> None:
    rate = 16000
    texts = ["a", "ab cd ef"]
    samples = np.concatenate([ac.encode(t, rate) for t in texts])
    events = decode_events(samples, rate, speech_start_ms=100)
    # "a" has only 30 ms of voice: not speech. "ab cd ef" has 180 ms: started in the 4th burst.
    check_structure(list(events), ["ab cd ef"])
    # Holding back never changes the words themselves.
    default = decode_events(samples, rate)
    assert finals(default) == texts
    assert isinstance(default[3], ac.SpeechStarted)
    assert events == default[3:]


def test_end_of_utterance_silence_parameter() -> None:
    rate = 16000
    texts = ["first", "second"]
    samples = np.concatenate([ac.encode(t, rate, trailing_silence_ms=200) for t in texts])
    assert finals(decode_events(samples, rate)) == texts
    assert finals(decode_events(samples, rate, end_of_utterance_silence_ms=250)) == ["first second"]
    assert finals(decode_events(samples, rate, end_of_utterance_silence_ms=80)) == texts


def test_finish_closes_an_open_utterance() -> None:
    rate = 11025
    samples = ac.encode("no tail", rate, trailing_silence_ms=0)
    decoder = ac.SpeechDecoder(rate)
    events = decoder.feed(samples)
    assert not any(isinstance(e, ac.UtteranceEnded) for e in events)
    assert decoder.in_utterance
    events += decoder.finish()
    check_structure(list(events), ["no tail"])
    assert isinstance(events[-1], ac.UtteranceEnded)
    assert events[-1].detected_at_samples == samples.size
    assert decoder.finish() == []
    with pytest.raises(RuntimeError):
        decoder.feed(samples[:10])


def test_silence_and_empty_input() -> None:
    rate = 16000
    assert ac.encode("", rate).size == 250 * rate // 1000
    assert ac.encode("  ", rate, trailing_silence_ms=0).size == 0
    decoder = ac.SpeechDecoder(rate)
    assert decoder.feed(np.zeros(0, dtype=np.int16)) == []
    assert decoder.feed(add_noise(np.zeros(rate * 3, dtype=np.int16), -50.0, seed=5)) == []
    assert decoder.finish() == []
    assert decoder.samples_consumed == rate * 3


def test_render_char_map() -> None:
    rate = 22050
    rendered = ac.render("  hi   yo!  ", rate, trailing_silence_ms=100)
    assert rendered.text == "hi yo!"
    ends_ms = [30, 70, 130, 160, 200, 240]  # h, i, gap, y, o, !
    starts_ms = [0, 40, 70, 130, 170, 210]

    def at(t_ms: int) -> int:  # rounded half up
        return (t_ms * rate + 500) // 1000

    assert rendered.char_end_samples.tolist() == [at(t) for t in ends_ms]
    assert rendered.char_start_samples.tolist() == [at(t) for t in starts_ms]
    assert rendered.speech_end_samples == at(240)
    assert rendered.samples.size == at(340)
    assert np.all(rendered.samples[rendered.speech_end_samples :] == 0)
    # A TTS tagging 20 ms chunks with the characters they complete covers every character once.
    spoken: list[str] = []
    done = 0
    step = rate // 50
    for s1 in range(step, rendered.samples.size + step, step):
        upto = int(np.searchsorted(rendered.char_end_samples, min(s1, rendered.samples.size), "right"))
        spoken.append(rendered.text[done:upto])
        done = upto
    assert "".join(spoken) == rendered.text


def test_encode_matches_render_and_leading_silence() -> None:
    rate = 8000
    assert np.array_equal(ac.encode("abc", rate), ac.render("abc", rate).samples)
    shifted = ac.encode("abc", rate, leading_silence_ms=100)
    assert np.array_equal(shifted[800:], ac.encode("abc", rate))
    assert not shifted[:800].any()


def test_argument_validation() -> None:
    for bad_rate in (7999, 48001, 0):
        with pytest.raises(ValueError):
            ac.encode("a", bad_rate)
        with pytest.raises(ValueError):
            ac.SpeechDecoder(bad_rate)
    with pytest.raises(TypeError):
        ac.SpeechDecoder(16000.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ac.SpeechDecoder(16000, end_of_utterance_silence_ms=30)
    with pytest.raises(ValueError):
        ac.encode("a", 16000, gain=-1.0)
    decoder = ac.SpeechDecoder(16000)
    with pytest.raises(TypeError):
        decoder.feed(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError):
        decoder.feed(np.zeros((2, 10), dtype=np.int16))


def test_other_integer_dtypes_are_accepted() -> None:
    rate = 16000
    samples = ac.encode("int32 in", rate)
    assert ac.decode_utterances(samples.astype(np.int32), rate) == ["int32 in"]
    assert ac.decode_utterances(samples.astype(np.int32) * 4, rate) == ["int32 in"]  # clipped
    assert ac.pcm16_to_bytes(np.array([70000, -70000], dtype=np.int64)) == bytes.fromhex("ff7f0080")


def test_memory_is_bounded() -> None:
    rate = 48000
    decoder = ac.SpeechDecoder(rate)
    speech = ac.encode(PARAGRAPH, rate)
    tone = np.tile(ac.encode("~", rate, trailing_silence_ms=0)[600:1000], 2000)  # 16 s of tone
    for chunk in (speech, tone, speech):
        decoder.feed(chunk)
        assert decoder._pending.size < decoder.frame_samples
        assert sum(p.size for p in decoder._burst_parts) <= ac.MAX_ANALYSIS_MS * rate // 1000
    # The tone ran into the second paragraph; that utterance ended in its trailing silence.
    assert decoder.finish() == []
    assert decoder.samples_consumed == 2 * speech.size + tone.size


def test_decode_speed(capsys: pytest.CaptureFixture[str]) -> None:
    """Decoding must be far faster than real time (the STT stub serves hundreds of sessions)."""
    rate = 16000
    samples = np.tile(ac.encode(PARAGRAPH, rate), 4)
    seconds = samples.size / rate
    speeds: dict[int, float] = {}
    for chunk_ms in (1000, 20):
        chunks = fixed_chunks(samples.size, rate * chunk_ms // 1000)
        start = time.process_time()
        events = decode_events(samples, rate, chunks)
        cpu = time.process_time() - start
        assert finals(events) == [ac.normalize_text(PARAGRAPH)] * 4
        speeds[chunk_ms] = seconds / max(cpu, 1e-9)
    with capsys.disabled():
        print(
            f"\naudio_code decode speed at 16 kHz: {speeds[1000]:.0f}x real time (1 s chunks),"
            f" {speeds[20]:.0f}x real time (20 ms chunks)"
        )
    assert speeds[20] >= 100  # generous floor for slow CI; measured well above 500x
