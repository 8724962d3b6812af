"""File helpers every layer shares: one content digest for photos, weights and data files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), streamed so a large file is never read at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
