"""The journal's on-disk format: an append-only file of checksummed, length-prefixed records.

File: an 8-byte magic, then records. A record is a 9-byte header (kind: u8, payload length: u32,
CRC-32 of kind and payload: u32; big-endian) followed by the payload. A reader stops at the first
record that is short, has an unknown kind or a bad checksum: that is a write the agent did not
finish (a crash, a full disk), and everything after it is dropped with a warning.

Payloads:
- EVENT: a serialized ``dispatch.v1.Event``;
- ACK: command_host_id u64, seq u64 (every event of that CommandHost up to seq is delivered);
- CLAIM: command_host_id u64 (the agent accepted this Run; never start it again);
- PROCESS: command_host_id u64, pid u32, pgid u32, start time u64;
- COMMAND: a compacted CommandHost: id u64, next seq u64, acked seq u64, stdout bytes u64,
  stderr bytes u64, pid u32, pgid u32, start time u64, finished u8 (pid 0: no process known);
- REMEMBERED: command_host_ids, u64 each, oldest first (written by compaction).

Every function here is synchronous and meant to run in a worker thread.
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"DSPJRN01"

_HEADER = struct.Struct(">BII")
ACK = struct.Struct(">QQ")
CLAIM = struct.Struct(">Q")
PROCESS = struct.Struct(">QIIQ")
COMMAND = struct.Struct(">QQQQQIIQB")


class Kind(enum.IntEnum):
    EVENT = 1
    ACK = 2
    CLAIM = 3
    PROCESS = 4
    COMMAND = 5
    REMEMBERED = 6


class StateDirectoryError(Exception):
    """The state directory cannot hold this agent's journal; the agent cannot start."""


class NotAJournal(StateDirectoryError):
    """The file exists but does not start with the journal's magic; it is left untouched."""


@dataclass(frozen=True, slots=True)
class Scan:
    records: list[tuple[Kind, bytes]]
    valid_bytes: int  # length of the readable prefix
    dropped_bytes: int  # unreadable tail after it


def encode(kind: Kind, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((kind,))))
    return _HEADER.pack(kind, len(payload), crc) + payload


def encode_ids(ids: Iterable[int]) -> bytes:
    packed = array("Q", ids)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def decode_ids(payload: bytes) -> list[int]:
    packed = array("Q")
    packed.frombytes(payload[: len(payload) - len(payload) % packed.itemsize])
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tolist()


class JournalLocked(StateDirectoryError):
    """Another agent (process or in-process identity) already uses this state directory."""


def lock_directory(directory: Path) -> int:
    """Create ``directory`` and take its lock; the returned fd holds it until closed.

    ``flock`` locks belong to an open file description, so two agent identities in one process
    pointed at the same directory exclude each other as well as two processes do.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirectoryError(f"cannot use {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalLocked(f"{directory} is in use by another dispatch-agent") from None
    return fd


def scan(path: Path) -> Scan:
    """Every readable record of the journal at ``path`` (an empty scan if there is none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Scan([], 0, 0)
    except OSError as exc:
        raise StateDirectoryError(f"cannot read {path}: {exc.strerror}") from exc
    if not data:
        return Scan([], 0, 0)
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # the very first write was cut short
            return Scan([], 0, len(data))
        raise NotAJournal(f"{path} is not a dispatch-agent journal")
    records: list[tuple[Kind, bytes]] = []
    offset = len(MAGIC)
    kinds = set(Kind)
    while offset + _HEADER.size <= len(data):
        kind, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if kind not in kinds or len(payload) < length:
            break
        if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
            break
        records.append((Kind(kind), payload))
        offset = start + length
    return Scan(records, offset, len(data) - offset)


def open_for_append(path: Path, valid_bytes: int) -> int:
    """The journal opened for appending, cut back to its readable prefix (or started fresh)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, valid_bytes)
        if valid_bytes == 0:
            _write_all(fd, MAGIC)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append(fd: int, data: bytes, *, sync: bool) -> None:
    _write_all(fd, data)
    if sync:
        os.fsync(fd)


def truncate(fd: int, length: int) -> None:
    """Cut off a partial append so the next one does not land behind garbage."""
    os.ftruncate(fd, length)


def rewrite(path: Path, records: bytes, *, sync: bool) -> int:
    """Atomically replace the journal with ``MAGIC + records``; returns the new append fd.

    Written to a temporary file, fsynced, renamed over the old one and the directory fsynced, so
    a crash leaves either the old journal or the new one, never a mix.
    """
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, MAGIC + records)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if sync:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
