"""Session audio kept for the STT link to replay: since the end of the last final transcript
(bounded), so that a new Transcribe call after a broken one starts exactly where the last final
transcript ended.

Between utterances the buffer is bounded by what STT has heard: only audio that a call still
alive carried to STT a while ago can be dropped, as STT would have reported speech starting in
it by now. Audio sent on a call that broke counts as unheard (its speech event may have been
lost with the call), and so does audio held while STT is unreachable: the start of an utterance
spoken during an outage is never dropped."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from voicepipe.audio_format import PcmFormat

log = logging.getLogger(__name__)

# How long after STT was sent audio it has surely reported any speech starting in it (when no
# utterance is open, older audio that a live call carried is dropped).
IDLE_REPLAY_S = 2.0
# Upper bound on audio kept for replay (an utterance, or audio buffered while STT is down).
MAX_REPLAY_S = 60.0


@dataclass(slots=True)
class _Chunk:
    seq: int
    start_sample: int
    data: bytes
    arrived_at: float
    sent_at: float | None = None  # when the live call sent it (None: not sent on the live call)


class ReplayBuffer:
    """Session audio since the end of the last final transcript, numbered for the writer."""

    def __init__(self, fmt: PcmFormat, start_sample: int = 0) -> None:
        """`start_sample`: where the first audio appended sits in the session audio (a resumed
        conversation's audio goes on from its ticket's offset)."""
        self.fmt = fmt
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self.next_seq = 0
        self.end_sample = start_sample
        self.changed = asyncio.Event()

    def append(self, data: bytes, arrived_at: float) -> None:
        self._chunks.append(_Chunk(self.next_seq, self.end_sample, data, arrived_at))
        self.next_seq += 1
        self.end_sample += len(data) // self.fmt.bytes_per_sample
        self.changed.set()

    @property
    def first_seq(self) -> int:
        return self._chunks[0].seq if self._chunks else self.next_seq

    @property
    def start_sample(self) -> int:
        return self._chunks[0].start_sample if self._chunks else self.end_sample

    def chunk(self, seq: int) -> _Chunk:
        return self._chunks[seq - self.first_seq]

    def arrival_of(self, sample: int) -> float:
        """When the audio holding `sample` arrived (the latest arrival if it is not held)."""
        for chunk in reversed(self._chunks):
            if chunk.start_sample <= sample:
                return chunk.arrived_at
        return self._chunks[0].arrived_at if self._chunks else time.monotonic()

    def mark_sent(self, first_seq: int, end_seq: int, sent_at: float) -> None:
        for seq in range(max(first_seq, self.first_seq), end_seq):  # some may be dropped since
            self.chunk(seq).sent_at = sent_at

    def forget_sent(self) -> None:
        """The call broke: what it sent may not have been heard."""
        for chunk in self._chunks:
            chunk.sent_at = None

    def _heard_until(self, now: float) -> int:
        """The end of the leading audio that the live call sent at least IDLE_REPLAY_S ago."""
        end = self.start_sample
        for chunk in self._chunks:
            if chunk.sent_at is None or chunk.sent_at > now - IDLE_REPLAY_S:
                break
            end = chunk.start_sample + len(chunk.data) // self.fmt.bytes_per_sample
        return end

    def trim_before(self, sample: int, *, sent_seq: int) -> None:
        """Forgets audio before `sample`, cutting a chunk in two where needed, so that a replay
        starts exactly there. Chunks not yet sent (seq >= sent_seq) are kept whole."""
        bps = self.fmt.bytes_per_sample
        while self._chunks and self._chunks[0].seq < sent_seq:
            head = self._chunks[0]
            head_end = head.start_sample + len(head.data) // bps
            if head_end <= sample:
                self._chunks.popleft()
            else:
                if head.start_sample < sample:
                    cut = (sample - head.start_sample) * bps
                    head.data = head.data[cut:]
                    head.start_sample = sample
                break

    def bound(self, *, utterance_open: bool, sent_seq: int, now: float) -> None:
        keep_from = self.end_sample - int(MAX_REPLAY_S * self.fmt.sample_rate)
        if not utterance_open:
            keep_from = max(keep_from, self._heard_until(now))
        self.trim_before(keep_from, sent_seq=sent_seq)
        if self.end_sample - self.start_sample > MAX_REPLAY_S * self.fmt.sample_rate:
            # STT has been unreachable for over a minute: drop the oldest audio, and say so.
            log.error("stt replay buffer full; dropping audio", extra={"limit_s": MAX_REPLAY_S})
            self.trim_before(
                self.end_sample - int(MAX_REPLAY_S * self.fmt.sample_rate), sent_seq=self.next_seq
            )

    @property
    def held_seconds(self) -> float:
        return (self.end_sample - self.start_sample) / self.fmt.sample_rate
