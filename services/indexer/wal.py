"""Append-only write-ahead log: every acknowledged write is on disk (fsync) before the reply.

Layout: ``<data_dir>/wal/<segment:08d>.wal``. A snapshot *rotates* the log (starts a new
segment) and, once the snapshot is durable, deletes the older segments, so the log only holds
writes newer than the current snapshot.

Segment file  := SEGMENT_MAGIC (8 bytes) | segment number (u64 LE) | record*
Record        := b"REC1" | payload length (u32) | crc32 (u32) of seq+payload | seq (u64) | payload
Payload       := kind (u8) | header length (u32) | header (UTF-8 JSON) | body (raw bytes)

``seq`` numbers every record of the data directory, 1, 2, 3, ... across segments; replay
checks they are consecutive, so a lost segment cannot go unnoticed.

Recovery rule: damage at the very end of the newest segment with nothing valid after it is a
*torn tail* (the process died mid-append, so the write was never acknowledged): it is dropped
with a warning and the file truncated. Any other damage - a bad record followed by valid ones,
a damaged older segment, a gap in segments or sequence numbers - raises CorruptData, because
acknowledged writes would be lost.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Iterator

from services.indexer.errors import CorruptData

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"MKTWAL01"
SEGMENT_HEADER = struct.Struct("<8sQ")
RECORD_MAGIC = b"REC1"
RECORD_HEADER = struct.Struct("<4sIIQ")
PAYLOAD_HEADER = struct.Struct("<BI")
MAX_RECORD_BYTES = 1 << 31
_SEQ = struct.Struct("<Q")


class RecordKind(IntEnum):
    CREATE_COLLECTION = 1
    UPSERT = 2
    DELETE = 3


@dataclass(frozen=True)
class WalRecord:
    seq: int
    kind: RecordKind
    header: dict
    body: bytes


def encode_record(seq: int, kind: RecordKind, header: dict, body: bytes = b"") -> bytes:
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    payload = PAYLOAD_HEADER.pack(int(kind), len(header_bytes)) + header_bytes + body
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), crc, seq) + payload


def _decode_payload(seq: int, payload: bytes) -> WalRecord:
    kind, header_len = PAYLOAD_HEADER.unpack_from(payload)
    start = PAYLOAD_HEADER.size
    header = json.loads(payload[start : start + header_len].decode("utf-8"))
    return WalRecord(seq, RecordKind(kind), header, payload[start + header_len :])


def decode_record(data: bytes) -> WalRecord:
    """One record in the encoding above (as `encode_record` writes it), checksum verified;
    CorruptData when it is damaged. Used to ship WAL records between replicas."""
    if len(data) < RECORD_HEADER.size:
        raise CorruptData(f"WAL record of {len(data)} bytes is shorter than its header")
    magic, length, crc, seq = RECORD_HEADER.unpack_from(data)
    payload = data[RECORD_HEADER.size :]
    if (
        magic != RECORD_MAGIC
        or length != len(payload)
        or zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc
    ):
        raise CorruptData(f"WAL record {seq} fails its checksum or length check")
    try:
        return _decode_payload(seq, payload)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptData(f"WAL record {seq} cannot be decoded: {exc}") from None


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:08d}.wal"


def list_segments(directory: Path) -> list[int]:
    if not directory.exists():
        return []
    numbers = []
    for path in directory.glob("*.wal"):
        try:
            numbers.append(int(path.stem))
        except ValueError:
            raise CorruptData(f"unexpected file {path} in the WAL directory; move it away") from None
    return sorted(numbers)


def fsync_path(path: Path) -> None:
    """fsync a file's data or a directory's entries (opened read-only, as POSIX allows both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SegmentReader:
    """Reads the records of one segment; finds where its valid part ends."""

    def __init__(self, path: Path, segment: int, is_last: bool) -> None:
        self.path = path
        self.segment = segment
        self.is_last = is_last
        self.valid_end = SEGMENT_HEADER.size
        self.torn = False
        self.size = path.stat().st_size

    def records(self) -> Iterator[WalRecord]:
        with open(self.path, "rb") as f:
            if not self._header_ok(f):
                return
            offset = SEGMENT_HEADER.size
            while offset < self.size:
                record = self._read_at(f, offset)
                if record is None:
                    self._damaged(f, offset)
                    return
                seq, payload, end = record
                try:
                    decoded = _decode_payload(seq, payload)
                except (ValueError, struct.error, UnicodeDecodeError) as exc:
                    # the checksum matched, so this is not a torn write but a bad writer
                    raise CorruptData(
                        f"WAL {self.path}: record at offset {offset} passes its "
                        f"checksum but cannot be decoded ({exc})"
                    ) from None
                offset = self.valid_end = end
                yield decoded

    def _header_ok(self, f: BinaryIO) -> bool:
        raw = f.read(SEGMENT_HEADER.size)
        if len(raw) < SEGMENT_HEADER.size:
            if self.is_last:  # died while creating the segment: nothing was logged in it
                log.warning("WAL segment %s has a torn header; treating it as empty", self.path)
                self.torn, self.valid_end = True, 0
                return False
            raise CorruptData(f"WAL segment {self.path} is truncated inside its header")
        magic, number = SEGMENT_HEADER.unpack(raw)
        if magic != SEGMENT_MAGIC or number != self.segment:
            raise CorruptData(
                f"WAL segment {self.path} has a bad header (magic {magic!r}, number "
                f"{number}); it is not a WAL file of this indexer"
            )
        return True

    def _read_at(self, f: BinaryIO, offset: int) -> tuple[int, bytes, int] | None:
        """(seq, payload, end offset) of an intact record at ``offset``, else None."""
        if offset + RECORD_HEADER.size > self.size:
            return None
        f.seek(offset)
        magic, length, crc, seq = RECORD_HEADER.unpack(f.read(RECORD_HEADER.size))
        end = offset + RECORD_HEADER.size + length
        if magic != RECORD_MAGIC or length > MAX_RECORD_BYTES or end > self.size:
            return None
        payload = f.read(length)
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            return None
        return seq, payload, end

    def _damaged(self, f: BinaryIO, offset: int) -> None:
        """A bad record at ``offset``: a torn tail if nothing valid follows in the newest
        segment, otherwise corruption."""
        where = f"WAL segment {self.path} at offset {offset} of {self.size} bytes"
        if not self.is_last:
            raise CorruptData(
                f"{where}: damaged record in a segment that is not the newest; "
                "acknowledged writes after it would be lost. Restore the data directory "
                "from a backup or rebuild the index (python -m services.indexer.build)"
            )
        f.seek(offset + 1)
        rest = f.read()
        position = rest.find(RECORD_MAGIC)
        while position >= 0:
            if self._read_at(f, offset + 1 + position) is not None:
                raise CorruptData(
                    f"{where}: damaged record followed by valid records; refusing to "
                    "start rather than drop acknowledged writes. Restore the data "
                    "directory from a backup or rebuild the index"
                )
            position = rest.find(RECORD_MAGIC, position + 1)
        log.warning(
            "dropping torn WAL tail: %s (%d bytes of an unacknowledged write)", where, self.size - offset
        )
        self.torn = True


class WriteAheadLog:
    """The open, newest segment of the log plus recovery of all segments."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment = 0
        self.next_seq = 1
        self._file: BinaryIO | None = None
        self.records_since_rotation = 0
        self.bytes_since_rotation = 0

    # -- recovery ----------------------------------------------------------------------------------
    def recover(self, first_segment: int, last_snapshot_seq: int) -> Iterator[WalRecord]:
        """Yield the records newer than the snapshot, in order; afterwards the log is open for
        appending (torn tail truncated). Segments older than ``first_segment`` are already in the
        snapshot and are deleted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = list_segments(self.directory)
        for old in [s for s in segments if s < first_segment]:
            segment_path(self.directory, old).unlink()
        segments = [s for s in segments if s >= first_segment]
        if segments and segments[0] != first_segment:
            raise CorruptData(
                f"WAL segment {first_segment:08d} is missing from {self.directory} "
                f"(found {segments[0]:08d} first): writes after the snapshot are lost"
            )
        for previous, current in zip(segments, segments[1:]):
            if current != previous + 1:
                raise CorruptData(f"WAL segment {previous + 1:08d} is missing from {self.directory}")
        expected = last_snapshot_seq + 1
        last_reader: _SegmentReader | None = None
        for number in segments:
            reader = _SegmentReader(segment_path(self.directory, number), number, number == segments[-1])
            for record in reader.records():
                if record.seq < expected:
                    continue  # already in the snapshot
                if record.seq != expected:
                    raise CorruptData(
                        f"WAL {reader.path}: record sequence jumps from {expected - 1} "
                        f"to {record.seq}; records are missing"
                    )
                expected += 1
                yield record
            last_reader = reader
        self.next_seq = expected
        if last_reader is None:
            self._create_segment(first_segment)
        elif last_reader.valid_end == 0:
            self._create_segment(last_reader.segment)
        else:
            self._open_for_append(last_reader)

    def records_after(self, seq: int) -> list[WalRecord]:
        """The records with a sequence number above ``seq`` in the segments on disk (the caller
        keeps appends out meanwhile, e.g. under the store's write lock)."""
        if self._file is not None:
            self._file.flush()
        segments = list_segments(self.directory)
        records = []
        for number in segments:
            reader = _SegmentReader(segment_path(self.directory, number), number, number == segments[-1])
            records.extend(r for r in reader.records() if r.seq > seq)
        return records

    def _open_for_append(self, reader: _SegmentReader) -> None:
        self.segment = reader.segment
        self._file = open(reader.path, "r+b")
        if reader.torn or reader.valid_end != reader.size:
            self._file.truncate(reader.valid_end)
            self._sync()
        self._file.seek(reader.valid_end)

    def _create_segment(self, number: int) -> None:
        path = segment_path(self.directory, number)
        self._file = open(path, "wb")
        self._file.write(SEGMENT_HEADER.pack(SEGMENT_MAGIC, number))
        self._sync()
        if self.fsync:
            fsync_path(self.directory)
        self.segment = number
        self.records_since_rotation = 0
        self.bytes_since_rotation = 0

    # -- writing -------------------------------------------------------------------------------------
    def append(self, kind: RecordKind, header: dict, body: bytes = b"") -> int:
        """Write one record and make it durable; returns its sequence number. Callers serialise."""
        if self._file is None:
            raise RuntimeError("WAL is not open (call recover first)")
        seq = self.next_seq
        data = encode_record(seq, kind, header, body)
        start = self._file.tell()
        try:
            self._file.write(data)
            self._sync()
        except BaseException:
            # leave no partial record behind a failed append (e.g. disk full)
            try:
                self._file.seek(start)
                self._file.truncate(start)
            except OSError:
                pass
            raise
        self.next_seq = seq + 1
        self.records_since_rotation += 1
        self.bytes_since_rotation += len(data)
        return seq

    def rotate(self) -> int:
        """Close the current segment and start the next; returns the new segment number."""
        self.close()
        self._create_segment(self.segment + 1)
        return self.segment

    def drop_before(self, segment: int) -> None:
        """Delete segments older than ``segment`` (their writes are in a durable snapshot)."""
        for number in list_segments(self.directory):
            if number < segment:
                segment_path(self.directory, number).unlink(missing_ok=True)

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        if self.fsync:
            os.fdatasync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
