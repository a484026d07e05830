"""Expert and reader files: safetensors whose bytes depend only on their tensors and metadata, so that
a file's checksum names its content (the bank stores both content-addressed)."""
from __future__ import annotations

import json


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted: safetensors writes the metadata
    in a hash map's order, which changes from call to call, so equal experts would get different bytes,
    checksums and file names. The tensors' bytes and offsets are unchanged; the header is padded with
    spaces to a multiple of 8 bytes, as safetensors pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]
