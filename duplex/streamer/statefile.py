"""State files: a saved streaming state, enough to continue a conversation exactly.

Layout (little-endian):

    magic      8 bytes  b"DPLXSTAT"
    version    u32
    header_len u32
    header     header_len bytes of UTF-8 JSON: fingerprints, metadata, tensor index
    payload    the tensors' raw bytes, at the offsets the index gives
    checksum   32 bytes: SHA-256 of everything above

A state belongs to one model and one codec: the header carries both fingerprints, and loading
into anything else is a `StateFileError` naming what differs. Loading validates the whole file
(magic, version, sizes, checksum, every tensor's bounds) before returning anything, so a corrupt
or truncated file changes nothing. Saving writes a temporary file and renames it, so a full disk
or a crash never leaves a half-written state in place of a good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"DPLXSTAT"
VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class StateFileError(ValueError):
    """A state file that cannot be loaded here: corrupt, truncated, or for another model/codec."""


def fingerprint(module: torch.nn.Module, config: Any = None) -> str:
    """SHA-256 (hex, 16 chars) of a module's config and parameter/buffer bytes.

    Two modules share a fingerprint only if they compute the same function, so a state saved
    from one can continue in the other.
    """
    h = hashlib.sha256()
    if config is not None:
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        # An empty tensor (a session with no history yet) has no bytes; viewing it fails.
        return b""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def save_state(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model_fingerprint: str,
    codec_fingerprint: str,
) -> Path:
    """Write a state file atomically; returns its path."""
    path = Path(path)
    index, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        b = _tensor_bytes(t)
        index.append(
            {
                "name": name,
                "dtype": _NAMES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": len(b),
            }
        )
        chunks.append(b)
        offset += len(b)
    header = {
        "format": "duplex-state",
        "version": VERSION,
        "model_fingerprint": model_fingerprint,
        "codec_fingerprint": codec_fingerprint,
        "created_unix": time.time(),
        "meta": meta,
        "tensors": index,
    }
    hb = json.dumps(header, sort_keys=True).encode()
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for piece in (_PREFIX.pack(MAGIC, VERSION, len(hb)), hb, *chunks):
                h.update(piece)
                f.write(piece)
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"could not write state file {path}: {e.strerror}") from e
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a state file (validated like `load_state`, fingerprints not checked)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"state file {path} does not exist") from None
    if len(data) < _PREFIX.size + 32:
        raise StateFileError(f"{path} is too short to be a duplex state file ({len(data)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StateFileError(f"{path} is not a duplex state file (bad magic {magic!r})")
    if version != VERSION:
        raise StateFileError(
            f"{path} is state format version {version}; this duplex reads version {VERSION}"
        )
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{path} is corrupt or truncated (checksum mismatch)")
    start = _PREFIX.size
    if start + hlen > len(body):
        raise StateFileError(f"{path} is truncated (header runs past the end)")
    try:
        header = json.loads(body[start : start + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{path} has an unreadable header: {e}") from None
    payload = body[start + hlen :]
    for entry in header.get("tensors", []):
        end = entry["offset"] + entry["nbytes"]
        if entry["dtype"] not in _DTYPES or end > len(payload) or entry["offset"] < 0:
            raise StateFileError(f"{path}: tensor {entry.get('name')!r} is out of bounds")
    return header, payload


def load_state(
    path: str | os.PathLike,
    model_fingerprint: str | None = None,
    codec_fingerprint: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a state file; returns (tensors, meta).

    With fingerprints given, a state saved for another model or codec is a StateFileError.
    """
    path = Path(path)
    header, payload = _read(path)
    for what, want in (("model", model_fingerprint), ("codec", codec_fingerprint)):
        have = header.get(f"{what}_fingerprint")
        if want is not None and have != want:
            raise StateFileError(
                f"{path} was saved for a different {what} (fingerprint {have}, "
                f"this {what} is {want}); load it with the {what} that saved it"
            )
    tensors = {}
    for e in header["tensors"]:
        if e["nbytes"] == 0:
            tensors[e["name"]] = torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
            continue
        raw = np.frombuffer(payload, dtype=np.uint8, count=e["nbytes"], offset=e["offset"])
        t = torch.from_numpy(raw.copy()).view(_DTYPES[e["dtype"]]).reshape(e["shape"])
        tensors[e["name"]] = t
    return tensors, header["meta"]
