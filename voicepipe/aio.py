"""Task helpers every service uses: one way to stop tasks and wait for them."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancels the tasks and waits until each has finished, so nothing they hold outlives the
    caller. Their own errors are not raised here: the owner reads them with result() where
    they matter (one nobody read is logged by asyncio as never retrieved). A cancellation of
    the caller itself is re-raised once they are done."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    if not pending:
        return
    outer_cancelled = False
    while True:
        try:
            await asyncio.wait(pending)
            break
        except asyncio.CancelledError:
            # The caller was cancelled while waiting: keep waiting (the tasks are already
            # cancelled and will finish), then pass the cancellation on.
            outer_cancelled = True
    if outer_cancelled:
        raise asyncio.CancelledError
