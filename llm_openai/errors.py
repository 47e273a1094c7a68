"""How a backend's failures reach the stage's caller: each as the gRPC status a caller can act
on (retry, back off, fix the request, fix the deployment), with the backend's own message
except where it could echo the credentials."""

from __future__ import annotations

import grpc
import openai

from voicepipe.stage import StageError

Code = grpc.StatusCode


def backend_error(error: openai.OpenAIError, base_url: str) -> StageError:
    """The StageError for a failed call to the backend at `base_url`."""
    if isinstance(error, openai.APITimeoutError):
        return StageError(Code.DEADLINE_EXCEEDED, f"the language model backend at {base_url} timed out")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return StageError(
            Code.UNAVAILABLE, f"the language model backend at {base_url} is unreachable: {cause}"
        )
    if isinstance(error, openai.APIStatusError):
        return _status_error(error, base_url)
    # A failure the backend reported inside an accepted stream.
    return StageError(Code.UNAVAILABLE, f"the language model backend at {base_url} failed: {error}")


def _status_error(error: openai.APIStatusError, base_url: str) -> StageError:
    status = error.status_code
    said = f"the language model backend at {base_url} answered HTTP {status}"
    if status in (401, 403):
        # Some APIs quote part of a rejected key in their message: it is not passed on.
        code = Code.UNAUTHENTICATED if status == 401 else Code.PERMISSION_DENIED
        return StageError(
            code, f"{said}: the API key was refused (set VOICEPIPE_LLM_API_KEY or --api-key-file)"
        )
    message = f"{said}: {_backend_message(error)}"
    if status == 429:
        return StageError(Code.RESOURCE_EXHAUSTED, message)
    if status == 404:
        # The model or the path is the deployment's choice, not the request's.
        return StageError(Code.FAILED_PRECONDITION, message)
    if status in (408, 504):
        return StageError(Code.DEADLINE_EXCEEDED, message)
    if 400 <= status < 500:
        return StageError(Code.INVALID_ARGUMENT, message)
    return StageError(Code.UNAVAILABLE, message)


def _backend_message(error: openai.APIStatusError) -> str:
    """The backend's explanation: the `message` of OpenAI's error object, FastAPI's `detail`,
    else the SDK's summary (which quotes the body)."""
    body = error.body
    if isinstance(body, dict):
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return error.message
