"""Expert and reader files: safetensors whose bytes depend only on their tensors and metadata, so that
a file's checksum names its content (the bank stores both content-addressed), written so that a crash
leaves either the old file or the new one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted: safetensors writes the metadata
    in a hash map's order, which changes from call to call, so equal experts would get different bytes,
    checksums and file names. The tensors' bytes and offsets are unchanged; the header is padded with
    spaces to a multiple of 8 bytes, as safetensors pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def write_durably(folder: Path, name: str, data: bytes) -> None:
    """``folder/name`` holds ``data`` once this returns, even after a crash: written to a temporary file,
    fsynced, renamed, and the folder fsynced."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
