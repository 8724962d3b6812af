"""Snapshots: every collection's FAISS index, id map and attributes at one WAL position.

Layout under the data directory::

    CURRENT                      name of the current snapshot ("00000007"), replaced atomically
    snapshots/00000007/          one directory per snapshot, named after the first WAL segment
        manifest.json            format, last WAL seq, collections, files with sizes and CRC32
        c0.faiss c0.ids.json c0.columns.npz  ...

A snapshot is written into ``snapshots/.tmp-*``, fsynced, renamed into place, and only then
``CURRENT`` is switched (write temp file, fsync, rename, fsync directory). A crash at any point
leaves either the old or the new snapshot current, never a half-written one. Loading verifies
every file's size and checksum and refuses to start on any mismatch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from services.indexer.errors import CorruptData
from services.indexer.spec import CollectionSpec
from services.indexer.vector_index import VectorIndex
from services.indexer.wal import fsync_path

log = logging.getLogger(__name__)

FORMAT = "marketplace-indexer-snapshot/1"
CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LoadedSnapshot:
    name: str
    last_seq: int
    wal_segment: int
    collections: dict[str, VectorIndex]
    #: Wall-clock time (ms) of the newest write in it; 0 for snapshots written before replicas.
    last_write_ms: int = 0


def file_crc32(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_snapshot(
    data_dir: Path,
    wal_segment: int,
    last_seq: int,
    collections: list[VectorIndex],
    *,
    fsync: bool = True,
    last_write_ms: int = 0,
) -> str:
    """Write a snapshot of ``collections`` (callers hold their writer locks) and make it
    current; returns its name. Older snapshots are removed afterwards."""
    root = data_dir / SNAPSHOTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"{wal_segment:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    entries = []
    for number, index in enumerate(collections):
        saved = index.save(tmp, f"c{number}")
        files = {}
        for role, file_name in saved["files"].items():
            path = tmp / file_name
            if fsync:
                fsync_path(path)
            files[role] = {"name": file_name, "bytes": path.stat().st_size, "crc32": file_crc32(path)}
        entries.append(
            {
                "spec": index.spec.to_json(),
                "trained": saved["trained"],
                "count": saved["count"],
                "files": files,
            }
        )
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "last_seq": last_seq,
        "wal_segment": wal_segment,
        "last_write_ms": last_write_ms,
        "collections": entries,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if fsync:
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
    final = root / name
    if final.exists():  # left by a crash before CURRENT was switched to it
        shutil.rmtree(final)
    os.rename(tmp, final)
    if fsync:
        fsync_path(root)
    _write_atomically(data_dir / CURRENT, name + "\n", fsync)
    for other in root.iterdir():
        if other.name != name:
            shutil.rmtree(other, ignore_errors=True)
    return name


def _write_atomically(path: Path, text: str, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


def read_snapshot(data_dir: Path) -> LoadedSnapshot | None:
    """Load the current snapshot, or None when the data directory has none yet.
    Raises CorruptData when it is missing, damaged or inconsistent."""
    pointer = data_dir / CURRENT
    if not pointer.exists():
        if (data_dir / SNAPSHOTS).exists() and any(
            p.name[:1] != "." for p in (data_dir / SNAPSHOTS).iterdir()
        ):
            raise CorruptData(
                f"{data_dir} has snapshots but no {CURRENT} file; restore it "
                f"(it holds the current snapshot's name) or rebuild the index"
            )
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    directory = data_dir / SNAPSHOTS / name
    manifest_path = directory / MANIFEST
    if not name or not manifest_path.exists():
        raise CorruptData(f"{pointer} names snapshot {name!r} but {manifest_path} does not exist")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptData(f"snapshot manifest {manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CorruptData(
            f"snapshot {manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    collections: dict[str, VectorIndex] = {}
    for entry in manifest["collections"]:
        spec = CollectionSpec.from_json(entry["spec"])
        for info in entry["files"].values():
            _verify_file(directory / info["name"], info)
        files = {role: info["name"] for role, info in entry["files"].items()}
        try:
            index = VectorIndex.load(spec, directory, {"files": files, "trained": entry["trained"]})
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise CorruptData(
                f"snapshot {directory}: collection {spec.name!r} cannot be loaded: {exc}"
            ) from None
        if index.count != entry["count"]:
            raise CorruptData(
                f"snapshot {directory}: collection {spec.name!r} holds {index.count} items, "
                f"manifest says {entry['count']}"
            )
        collections[spec.name] = index
    log.info(
        "loaded snapshot %s (%s)",
        name,
        ", ".join(f"{n}: {c.count}" for n, c in collections.items()) or "empty",
    )
    return LoadedSnapshot(
        name,
        int(manifest["last_seq"]),
        int(manifest["wal_segment"]),
        collections,
        int(manifest.get("last_write_ms", 0)),
    )


def _verify_file(path: Path, info: dict) -> None:
    if not path.exists():
        raise CorruptData(f"snapshot file {path} is missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CorruptData(
            f"snapshot file {path} has {size} bytes, manifest says {info['bytes']} (truncated or replaced)"
        )
    if file_crc32(path) != info["crc32"]:
        raise CorruptData(f"snapshot file {path} fails its checksum (damaged on disk)")
