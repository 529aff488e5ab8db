"""Statistics of one task: counts by status and exit code, durations, and groups of hosts whose
results were identical (same command, exit code and output digest).

Synchronous, run through ``Database.read``. A fixed number of queries whatever the task's size;
the (task, status) and (task, output_digest) indexes of ``command_host`` answer the big ones.
"""

from __future__ import annotations

import codecs
import math
from typing import Any

from peewee import SQL, fn

from daemon.store.models import CommandHost, OutputChunk
from daemon.store.queries import progress_counts, task_exists


def task_stats(
    task_id: int, *, max_groups: int, hosts_per_group: int, preview_bytes: int
) -> dict[str, Any] | None:
    """None when the task does not exist. Durations are of executions that have one (seconds;
    p95 by nearest rank). Groups: executions with a recorded output digest, largest first, each
    with its first ``hosts_per_group`` host ids and the start of one member's stdout."""
    if not task_exists(task_id):
        return None
    by_status = progress_counts(task_id)
    of_task = CommandHost.task == task_id
    by_exit_code = (
        CommandHost.select(CommandHost.exit_code, fn.COUNT(SQL("*")))
        .where(of_task, CommandHost.exit_code.is_null(False))
        .group_by(CommandHost.exit_code)
        .order_by(CommandHost.exit_code)
        .tuples()
    )
    return {
        "task_id": str(task_id),
        "total": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_exit_code": {str(code): count for code, count in by_exit_code},
        "duration_s": _durations(task_id),
        **_groups(task_id, max_groups, hosts_per_group, preview_bytes),
    }


def _durations(task_id: int) -> dict[str, Any]:
    timed = (CommandHost.task == task_id) & CommandHost.duration_s.is_null(False)
    count, low, mean, high = (
        CommandHost.select(
            fn.COUNT(CommandHost.duration_s),
            fn.MIN(CommandHost.duration_s),
            fn.AVG(CommandHost.duration_s),
            fn.MAX(CommandHost.duration_s),
        )
        .where(timed)
        .tuples()
        .get()
    )
    p95 = None
    if count:
        rank = math.ceil(0.95 * count)  # nearest rank: the smallest value >= 95% of them
        p95 = (
            CommandHost.select(CommandHost.duration_s)
            .where(timed)
            .order_by(CommandHost.duration_s)
            .offset(rank - 1)
            .limit(1)
            .scalar()
        )
    return {
        "count": count,
        "min": low,
        "avg": float(mean) if mean is not None else None,
        "p95": p95,
        "max": high,
    }


def _groups(task_id: int, max_groups: int, hosts_per_group: int, preview_bytes: int) -> dict:
    grouped = (CommandHost.task == task_id) & CommandHost.output_digest.is_null(False)
    key = (CommandHost.command_index, CommandHost.output_digest, CommandHost.exit_code)
    size = fn.COUNT(SQL("*"))
    groups_query = (
        CommandHost.select(*key, size, fn.MIN(CommandHost.id)).where(grouped).group_by(*key)
    )
    groups_total = groups_query.count()
    rows = list(
        groups_query.order_by(size.desc(), fn.MIN(CommandHost.id)).limit(max_groups).tuples()
    )
    if not rows:
        return {"groups": [], "groups_total": groups_total}

    # the first hosts of each listed group, in one query (a window over the group key)
    rank = fn.ROW_NUMBER().over(partition_by=list(key), order_by=[CommandHost.host_id])
    digests = sorted({row[1] for row in rows})
    ranked = (
        CommandHost.select(*key, CommandHost.host_id, rank.alias("rank"))
        .where(grouped, CommandHost.output_digest.in_(digests))
        .alias("ranked")
    )
    members = (
        CommandHost.select(
            ranked.c.command_index, ranked.c.output_digest, ranked.c.exit_code, ranked.c.host_id
        )
        .from_(ranked)
        .where(ranked.c.rank <= hosts_per_group)
        .order_by(ranked.c.command_index, ranked.c.output_digest, ranked.c.rank)
        .tuples()
    )
    hosts: dict[tuple[Any, ...], list[str]] = {}
    for command_index, digest, exit_code, host_id in members:
        hosts.setdefault((command_index, digest, exit_code), []).append(host_id)

    # the start of one member's stdout per group, in one query: the chunks that begin within
    # the preview, joined while they follow each other (output streamed line by line comes in
    # many small chunks)
    representatives = [row[4] for row in rows]
    chunks = (
        OutputChunk.select(OutputChunk.command_host, OutputChunk.offset, OutputChunk.data)
        .where(
            OutputChunk.command_host.in_(representatives),
            OutputChunk.stream == 1,
            OutputChunk.offset < preview_bytes,
        )
        .order_by(OutputChunk.command_host, OutputChunk.offset)
        .tuples()
    )
    previews: dict[int, bytes] = {}
    for ch_id, offset, data in chunks:
        have = previews.get(ch_id, b"")
        if offset == len(have):
            previews[ch_id] = (have + bytes(data))[:preview_bytes]
    groups = []
    for command_index, digest, exit_code, count, representative in rows:
        head = previews.get(representative)
        preview = ""
        if head is not None:
            # not final: a character cut by the preview's end is left out, not replaced
            preview = codecs.getincrementaldecoder("utf-8")("replace").decode(bytes(head))
        groups.append(
            {
                "command_index": command_index,
                "exit_code": exit_code,
                "output_digest": digest,
                "count": count,
                "hosts": hosts.get((command_index, digest, exit_code), []),
                "stdout_preview": preview,
            }
        )
    return {"groups": groups, "groups_total": groups_total}
