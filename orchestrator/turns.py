"""The conversation's turns, one at a time and in order, and the history they build.

A typed turn waits for the turn being played; speech interrupts it (barge-in). A turn that
arrives while nothing is playing or waiting starts at once: its Generate request leaves before
the caller queues anything else for the client (Early Generate; the runner is its only owner,
and closes every turn it started).

A spoken turn whose user goes on speaking before they could have heard its reply (their speech
began before its first audio left, or less than REACTION_S after) was answering a pause, not
the end of what the user meant to say: it is withdrawn (the client sees it interrupted and
`withdrawn`, the history forgets it) and its words open the user's next spoken turn, so one
utterance with a pause in it gets one answer, not two.

A speculative transcript starts its turn at once while the conversation is idle (its events held,
see speculation.py); the final transcript of the same words makes it the conversation's turn,
any other outcome cancels it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration

from orchestrator.metrics import SPECULATIVE, TURNS
from orchestrator.output import EventSink, SessionFailed, SessionOutput
from orchestrator.retry import StageFailed
from orchestrator.speculation import HeldOutput, Speculation
from orchestrator.tickets import Tickets
from orchestrator.timings import TurnTimings
from orchestrator.turn import Turn, TurnSettings
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, language_model_pb2, resumption_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe import history
from voicepipe.aio import cancel_and_wait
from voicepipe.logs import turn_id_var

log = logging.getLogger(__name__)

# A listener needs at least this long to hear the start of a reply and begin speaking over it:
# speech that began sooner after the reply's first audio left was not a reaction to it, but the
# user going on with what they were saying. (Both times are the orchestrator's: the client's
# round trip only lengthens the gap it measures, so a real barge-in is never taken for a pause.)
REACTION_S = 0.3

# Turns waiting while the agent answers an earlier one (typed turns queue; speech interrupts).
MAX_QUEUED_TURNS = 16
# The history a conversation keeps, in characters (some 8k tokens): older turns are forgotten.
HISTORY_LIMIT_CHARS = 32_000


@dataclass(slots=True)
class TurnRequest:
    text: str
    timings: TurnTimings
    turn: Turn | None = None  # already started, when it arrived while the conversation was idle
    spoken: bool = False  # from a final transcript (not typed)
    message: language_model_pb2.ChatMessage | None = None  # its place in the history
    speculation: Speculation | None = None  # its turn, already running (events held)
    audio_end: Duration | None = None  # where its utterance ends in the session audio (spoken)


@dataclass(frozen=True)
class TurnContext:
    """What every turn of a conversation shares."""

    session_id: str
    settings: TurnSettings
    upstreams: Upstreams
    output: SessionOutput
    turn_budget_s: float  # deadline for one turn's LLM and TTS calls
    session_deadline: float


class TurnRunner:
    """Runs the conversation's turns (as `run()`, its task) and remembers what was said; after
    each turn it sends the client a resumption ticket (with `tickets`)."""

    def __init__(
        self, context: TurnContext, start: resumption_pb2.ResumptionState, tickets: Tickets | None
    ) -> None:
        """`start`: the session's settings, and the history, turn count and audio offset it
        starts from (a new conversation's: the system prompt, 0, 0)."""
        self._context = context
        self._output = context.output
        self._state = start
        self._tickets = tickets
        self.history: list[language_model_pb2.ChatMessage] = list(start.history)
        self._turn_count = start.turns
        self._audio_covered = Duration()
        self._audio_covered.CopyFrom(start.audio_offset)
        self.draining = False
        self._requests: asyncio.Queue[TurnRequest | None] = asyncio.Queue(MAX_QUEUED_TURNS + 1)
        self._idle = False  # the runner waits for a request; nothing is being played
        self._playing: tuple[TurnRequest, Turn, asyncio.Task[None]] | None = None
        self._withdrawn: TurnRequest | None = None  # its words open the next spoken turn
        self._speculation: Speculation | None = None

    async def speculate(self, text: str, timings: TurnTimings) -> None:
        """A speculative transcript: its turn starts now, with its events held, if nothing is
        playing or waiting (and no withdrawn turn waits for the words that follow it)."""
        text = text.strip()
        if (current := self._speculation) is not None:
            if current.text == text:
                return
            await self._end_speculation("replaced")
        if not text or not self._idle or not self._requests.empty() or self._withdrawn is not None:
            return
        message = language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_USER, content=text)
        held = HeldOutput()
        turn = self._build_turn(str(self._turn_count + 1), [*self.history, message], timings, held)
        turn.open_early()
        self._speculation = Speculation(text, message, turn, held, self._start(turn))

    async def withdraw_speculation(self) -> None:
        """Speech resumed after the speculative transcript."""
        await self._end_speculation("withdrawn")

    async def _end_speculation(self, outcome: str) -> None:
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            await speculation.cancel(outcome)

    async def submit_speech(self, text: str, timings: TurnTimings, end: Duration) -> None:
        """A final transcript ending at `end` in the session audio: a turn, opened by the words
        of a turn withdrawn before it. A speculative turn on the same words becomes it."""
        words = [self._withdrawn.text if self._withdrawn else "", text.strip()]
        self._withdrawn = None
        joined = " ".join(word for word in words if word)
        speculation = self._speculation
        if speculation is not None and speculation.text == joined and self._idle and self._requests.empty():
            self._speculation = None
            self._turn_count += 1
            self.history.append(speculation.message)
            request = TurnRequest(
                joined,
                speculation.turn.timings,
                speculation.turn,
                spoken=True,
                message=speculation.message,
                speculation=speculation,
                audio_end=end,
            )
            self._requests.put_nowait(request)  # nothing waits (checked above): there is room
            return
        # Other words replace it; the same words while a turn plays or waits drop it (that turn goes
        # first, and this one starts afresh after it).
        await self._end_speculation(
            "replaced" if speculation is not None and speculation.text != joined else "dropped"
        )
        if joined:
            self.submit(TurnRequest(joined, timings, spoken=True, audio_end=end))

    def submit(self, request: TurnRequest) -> None:
        """Queues a turn; raises SessionFailed (and fails the session) when too many wait."""
        if self._idle and self._requests.empty():
            # Nothing is playing or waiting: the turn starts now (see Turn.open_early).
            request.turn = self._new_turn(request)
            request.turn.open_early()
        try:
            self._requests.put_nowait(request)
        except asyncio.QueueFull:
            failure = SessionFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {MAX_QUEUED_TURNS} turns are waiting for the agent to answer",
            )
            self._output.fail(failure)
            raise failure from None

    async def finish(self) -> None:
        """No more turns: run() returns once the ones queued have been played (a withdrawn
        turn that no later words joined is answered after all)."""
        if (withdrawn := self._withdrawn) is not None:
            await self.submit_speech("", withdrawn.timings, withdrawn.audio_end or Duration())
        await self._end_speculation("dropped")
        await self._requests.put(None)

    def drain(self) -> None:
        """The server is going away: run() returns once the turn being played has ended (and
        its ticket is out); turns waiting are not played (their client sends them again)."""
        self.draining = True
        if self._idle:
            with contextlib.suppress(asyncio.QueueFull):
                self._requests.put_nowait(None)

    def interrupt(self, speech_started_at: float | None = None) -> None:
        """Barge-in: stop the turn being played at once; no more of its audio leaves. A spoken
        turn is withdrawn when the speech that interrupts it (begun at `speech_started_at`, None:
        a client's BARGE_IN) was no reaction to its reply (see the module's docstring)."""
        if self._playing is None:
            return
        request, turn, task = self._playing
        if task.done() or turn.playout.interrupted:
            return
        first_audio_at = turn.timings.first_audio_at
        unheard = first_audio_at is None or (
            speech_started_at is not None and speech_started_at < first_audio_at + REACTION_S
        )
        if request.spoken and unheard:
            self._withdrawn = request
            if request.message is not None:
                self.history.remove(request.message)
        turn.interrupt()
        # At once, not when the runner next runs: the turn sends nothing more from now on. The
        # runner awaits the task (see _play).
        task.cancel()

    async def run(self) -> None:
        """One turn at a time, in order, until finish()."""
        try:
            while not self.draining:
                self._idle = True
                request = await self._requests.get()
                self._idle = False
                if request is None:
                    return
                if self.draining:
                    if request.turn is not None:
                        request.turn.close()
                    return
                turn = request.turn or self._new_turn(request)
                try:
                    await self._play(request, turn)
                finally:
                    turn.close()
                await self.send_ticket()
        finally:
            self._idle = False
            await self._end_speculation("dropped")
            while not self._requests.empty():  # the session ended with turns waiting
                if (waiting := self._requests.get_nowait()) is not None and waiting.turn:
                    waiting.turn.close()

    def _new_turn(self, request: TurnRequest) -> Turn:
        self._turn_count += 1
        request.message = language_model_pb2.ChatMessage(
            role=language_model_pb2.ROLE_USER, content=request.text
        )
        self.history.append(request.message)
        self.history = bounded(self.history)
        return self._build_turn(str(self._turn_count), list(self.history), request.timings, self._output)

    def _build_turn(
        self,
        turn_id: str,
        messages: list[language_model_pb2.ChatMessage],
        timings: TurnTimings,
        output: EventSink,
    ) -> Turn:
        context = self._context
        return Turn(
            messages=messages,
            correlation=common_pb2.Correlation(session_id=context.session_id, turn_id=turn_id),
            settings=context.settings,
            upstreams=context.upstreams,
            output=output,
            timings=timings,
            deadline=min(time.monotonic() + context.turn_budget_s, context.session_deadline),
            session_deadline=context.session_deadline,
        )

    def _start(self, turn: Turn) -> asyncio.Task[None]:
        token = turn_id_var.set(turn.turn_id)
        task = asyncio.create_task(turn.run(), name=f"session-{self._context.session_id}-turn-{turn.turn_id}")
        turn_id_var.reset(token)
        return task

    async def _play(self, request: TurnRequest, turn: Turn) -> None:
        await self._output.put(
            pb.ConverseResponse(
                turn_started=pb.TurnStarted(user_text=request.text), correlation=turn.correlation
            )
        )
        speculation = request.speculation
        task = speculation.task if speculation is not None else self._start(turn)
        self._playing = (request, turn, task)
        try:
            if speculation is not None:
                SPECULATIVE.labels("confirmed").inc()
                await speculation.output.release(self._output)
            await asyncio.wait([task])
        finally:
            self._playing = None
            await cancel_and_wait(task)
        await self._report(request, turn, task)

    async def _report(self, request: TurnRequest, turn: Turn, task: asyncio.Task[None]) -> None:
        """Says how the turn ended; the history keeps what the user heard of the reply."""
        withdrawn = task.cancelled() and request is self._withdrawn
        if not withdrawn and request.audio_end is not None:
            self._audio_covered.CopyFrom(request.audio_end)  # the history now holds its words
        if withdrawn:
            TURNS.labels("withdrawn").inc()
            log.info("turn withdrawn: the user went on speaking", extra={"turn": turn.turn_id})
            await self._output.put(
                pb.ConverseResponse(
                    turn_interrupted=pb.TurnInterrupted(heard_text=turn.heard_text, withdrawn=True),
                    correlation=turn.correlation,
                )
            )
        elif task.cancelled():  # barge-in
            TURNS.labels("interrupted").inc()
            self._remember_reply(turn.heard_text)
            log.info(
                "turn interrupted", extra={"turn": turn.turn_id, "heard_chars": turn.playout.heard_chars}
            )
            await self._output.put(
                pb.ConverseResponse(
                    turn_interrupted=pb.TurnInterrupted(heard_text=turn.heard_text),
                    correlation=turn.correlation,
                )
            )
        elif isinstance(failure := task.exception(), StageFailed):
            TURNS.labels("failed").inc()
            self._remember_reply(turn.heard_text)
            await report_stage_error(self._output, failure, turn.correlation)
        elif failure is not None:
            raise failure
        elif (cut_short := turn.cut_short) is not None:
            # Every word delivered has been spoken (the notice leaves after its audio): the
            # history keeps the reply as delivered, and the conversation goes on.
            TURNS.labels("cut_short").inc()
            self._remember_reply(turn.reply.text)
            await report_stage_error(self._output, cut_short, turn.correlation)
        else:
            TURNS.labels("completed").inc()
            self._remember_reply(turn.reply.text)
            await self._output.put(turn.completed_event())
            log.info("turn completed", extra={"turn": turn.turn_id, "reply_chars": len(turn.reply.text)})

    async def send_ticket(self) -> None:
        """The client's resumption ticket for the conversation as it stands (with tickets)."""
        if self._tickets is None:
            return
        covered = Duration()
        covered.CopyFrom(self._audio_covered)
        # Off the loop: a long conversation's history takes milliseconds to copy, measure and sign.
        ticket = await asyncio.to_thread(
            self._ticket, self._tickets, self._turn_count, covered, list(self.history)
        )
        if ticket is None:
            log.warning("no resumption ticket: the system prompt alone is over the ticket's limit")
            return
        await self._output.put(
            pb.ConverseResponse(
                resumption=ticket, correlation=common_pb2.Correlation(session_id=self._context.session_id)
            )
        )

    def _ticket(
        self,
        tickets: Tickets,
        turns: int,
        covered: Duration,
        history: list[language_model_pb2.ChatMessage],
    ) -> pb.ResumptionTicket | None:
        """(In a worker thread; only send_ticket touches the state template.)"""
        state = self._state
        state.turns = turns
        state.audio_offset.CopyFrom(covered)
        del state.history[:]
        state.history.extend(history)
        return tickets.issue(state)

    def _remember_reply(self, text: str) -> None:
        if text:
            self.history.append(
                language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_ASSISTANT, content=text)
            )


def bounded(messages: list[language_model_pb2.ChatMessage]) -> list[language_model_pb2.ChatMessage]:
    """The history cut to HISTORY_LIMIT_CHARS by the history rule (voicepipe.history), so that
    a long conversation's memory and requests stay bounded (the LLM stage cuts it further to fit
    its model's context)."""
    try:
        return history.trim(
            messages,
            HISTORY_LIMIT_CHARS,
            lambda m: len(m.content),
            is_system=lambda m: m.role == language_model_pb2.ROLE_SYSTEM,
            is_user=lambda m: m.role == language_model_pb2.ROLE_USER,
        )
    except history.TurnTooLong:
        return messages  # one turn alone: the LLM stage says what is wrong with it


async def report_stage_error(
    output: SessionOutput, failure: StageFailed, correlation: common_pb2.Correlation
) -> None:
    """A stage's failure as the client's error event (and a warning in the log)."""
    log.warning(
        "stage error",
        extra={"stage": pb.Stage.Name(failure.stage), "code": failure.code, "detail": failure.message},
    )
    await output.put(
        pb.ConverseResponse(
            error=pb.SessionError(stage=failure.stage, code=failure.code, message=failure.message),
            correlation=correlation,
        )
    )
