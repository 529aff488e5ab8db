"""Acknowledgements to agents: what each committed batch made durable, back to the sessions
whose events it held (``store.commits``), so their journals can let go of them."""

from __future__ import annotations

import trio

from daemon.store.commits import Committed


async def serve_acks(
    commits: trio.MemoryReceiveChannel[Committed],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async with commits:
        async for committed in commits:
            for sink, acks in committed.acks.items():
                sink.ack_nowait(acks)
