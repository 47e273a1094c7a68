"""What one backend can hold, and how the stage keeps within it: its slots (conversations decoded
at once; more wait here, in a bounded queue) and the context of one slot (the history sent is
trimmed to fit it, oldest turns first).

llama.cpp's server says both at `GET /props` (`total_slots`, and `n_ctx` of one slot); for other
servers (vLLM, Ollama, hosted APIs) give them with `--backend-slots` and `--context-tokens`, or
leave them 0: no slot bound, no trimming.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import httpx2

from voicepipe import history
from voicepipe.audio_format import InvalidInput
from voicepipe.stage import StageError
from voicepipe.stage.llm import Message

log = logging.getLogger(__name__)

# A text's tokens when the backend cannot count them (no llama.cpp `/tokenize`): byte-level BPE
# vocabularies average about 4 bytes of English a token; 2.5 leaves room for digits (often one
# token each), names and other languages. Each message also costs its chat template's role
# markers (ChatML: `<|im_start|>role\n` ... `<|im_end|>\n`, 5 tokens), and the reply its opening.
BYTES_PER_TOKEN = 2.5
TOKENS_PER_MESSAGE = 8
# Token counts remembered by text: a conversation resends its history every turn.
COUNT_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Capacity:
    """`slots`: generations the backend runs at once (0: unknown, no bound). `context_tokens`:
    prompt plus reply one generation may use (0: unknown, no trimming)."""

    slots: int = 0
    context_tokens: int = 0


def server_root(base_url: str) -> str:
    """The server's root for its own endpoints: the OpenAI API root without its `/v1`."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


async def ask_llama_cpp(client: httpx2.AsyncClient, base_url: str, headers: dict[str, str]) -> Capacity:
    """llama.cpp's own figures from `/props`, or an unknown Capacity from any other server."""
    try:
        response = await client.get(f"{server_root(base_url)}/props", headers=headers)
        response.raise_for_status()
        props = response.json()
        return Capacity(
            slots=int(props["total_slots"]),
            context_tokens=int(props["default_generation_settings"]["n_ctx"]),
        )
    except (httpx2.HTTPError, ValueError, KeyError, TypeError) as error:
        log.info("the backend does not say its slots and context", extra={"reason": str(error)})
        return Capacity()


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


class TokenCounter:
    """Counts a text's tokens with the backend's own tokenizer (llama.cpp's `POST /tokenize`),
    remembering the counts; estimates them (estimate_tokens) for a backend without one."""

    def __init__(self, client: httpx2.AsyncClient, base_url: str, headers: dict[str, str]) -> None:
        self._client = client
        self._url = f"{server_root(base_url)}/tokenize"
        self._headers = headers
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._tokenizer = True  # until the backend shows it has none

    async def count(self, text: str) -> int:
        if (known := self._counts.get(text)) is not None:
            self._counts.move_to_end(text)
            return known
        counted = await self._ask(text) if self._tokenizer else None
        tokens = counted if counted is not None else estimate_tokens(text)
        self._counts[text] = tokens
        if len(self._counts) > COUNT_CACHE_SIZE:
            self._counts.popitem(last=False)
        return tokens

    async def _ask(self, text: str) -> int | None:
        try:
            response = await self._client.post(self._url, json={"content": text}, headers=self._headers)
        except httpx2.HTTPError:
            return None  # the generation's own request reports a backend that is down
        if response.status_code == 404:
            log.info("the backend has no tokenizer endpoint: token counts are estimated")
            self._tokenizer = False
            return None
        try:
            return len(response.json()["tokens"])
        except (ValueError, KeyError, TypeError):
            return None


async def fit_context(
    messages: Sequence[Message], context_tokens: int, reply_tokens: int, counter: TokenCounter
) -> list[Message]:
    """The messages cut to leave `reply_tokens` of a `context_tokens` context (the history rule
    of voicepipe.history); InvalidInput when the newest turn alone cannot fit."""
    if not context_tokens:
        return list(messages)
    budget = context_tokens - reply_tokens - TOKENS_PER_MESSAGE
    counts = await asyncio.gather(*(counter.count(m.content) for m in messages))
    costs = {id(m): tokens + TOKENS_PER_MESSAGE for m, tokens in zip(messages, counts, strict=True)}
    try:
        return history.trim(
            messages,
            budget,
            lambda m: costs[id(m)],
            is_system=lambda m: m.role == "system",
            is_user=lambda m: m.role == "user",
        )
    except history.TurnTooLong as error:
        raise InvalidInput(
            f"the last user message needs about {error.cost} tokens with the system prompt; with"
            f" the reply's {reply_tokens} tokens that exceeds the model's context of {context_tokens}"
            " tokens per conversation"
        ) from None


class SlotQueue:
    """At most `slots` generations at once; up to `max_waiting` more wait for a slot in arrival
    order, and one beyond that is refused with RESOURCE_EXHAUSTED naming the limit. A waiting
    call that is cancelled leaves the queue at once."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.waiting = 0
        self._free = asyncio.Semaphore(slots) if slots else None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._free is None:
            yield
            return
        if self._free.locked() and self.waiting >= self.max_waiting:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the language model backend is busy: all {self.slots} slots are generating and"
                f" {self.waiting} requests already wait for one (the limit, --max-waiting"
                f" {self.max_waiting}); try again shortly",
            )
        self.waiting += 1
        if self._free.locked():
            log.info("waiting for a slot", extra={"waiting": self.waiting, "slots": self.slots})
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()
