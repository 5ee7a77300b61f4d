"""State files: a saved streaming state, enough to continue a conversation exactly.

Layout (little-endian):

    magic      8 bytes  b"DPLXSTAT"
    version    u32
    header_len u32
    header     header_len bytes of UTF-8 JSON: fingerprints, metadata, tensor index
    payload    the tensors' raw bytes, at the offsets the index gives
    checksum   32 bytes: SHA-256 of everything above
    signature  48 bytes (version 2): key id (16 bytes) and HMAC-SHA256(key, everything above
               the checksum); all zero when the file is unsigned

A state belongs to one model and one codec: the header carries both fingerprints, and loading
into anything else is a `StateFileError` naming what differs. Loading validates the whole file
(magic, version, sizes, checksum, the header's types, every tensor's dtype, shape and bounds)
before returning anything, so a corrupt, truncated or crafted file changes nothing and can never
make the reader allocate more than the file holds. Saving writes a temporary file and renames it,
so a full disk or a crash never leaves a half-written state in place of a good one (and a later
save removes the temporary files of writers that died).

A state file is untrusted input: the checksum only catches accidents, since anyone can recompute
it. A server that hands out states signs them with its own secret (`StateKeys`); it then accepts
back only states carrying a valid signature from one of its keys (the first key signs, the others
still verify, so a key can be rotated). Whatever a file holds, `duplex.streamer.engine` still
checks every value against the model before a slot changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"DPLXSTAT"
VERSION = 2
_READS = (1, 2)
_PREFIX = struct.Struct("<8sII")
_SIG = 48
_KEY_ID = 16
MAX_HEADER_BYTES = 4 << 20
MAX_TENSORS = 4096
MAX_DIMS = 8
_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,256}$")
_FINGERPRINT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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


class StateKeys:
    """Secrets that sign and verify state files: the first signs, every one verifies.

    A key is identified in the file by the first 16 bytes of SHA-256 over a label and the key,
    so the id reveals nothing usable about the key.
    """

    def __init__(self, keys: list[bytes]) -> None:
        keys = [bytes(k) for k in keys]
        if not keys or any(len(k) < 16 for k in keys):
            raise ValueError("state keys must be at least 16 bytes each, and one is needed")
        self._keys = {self.key_id(k): k for k in keys}
        self.signing_id = self.key_id(keys[0])

    @staticmethod
    def key_id(key: bytes) -> bytes:
        return hashlib.sha256(b"duplex state key id\0" + key).digest()[:_KEY_ID]

    @classmethod
    def random(cls) -> StateKeys:
        return cls([os.urandom(32)])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> StateKeys:
        """One secret per non-empty line (at least 16 characters); the first one signs."""
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
        return cls([ln.encode("utf-8") for ln in lines if ln])

    def signer(self) -> hmac.HMAC:
        """An HMAC with the signing key: feed it the body, append id + digest."""
        return hmac.new(self._keys[self.signing_id], digestmod=hashlib.sha256)

    def verify(self, body: bytes, sig: bytes) -> bool:
        key = self._keys.get(sig[:_KEY_ID])
        if key is None:
            return False
        return hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), sig[_KEY_ID:])


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


def encode_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model_fingerprint: str,
    codec_fingerprint: str,
    keys: StateKeys | None = None,
) -> bytes:
    """A whole state file as bytes (signed with `keys` when given): what `save_state` writes
    and what a server hands a client, with no file in between."""
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
    body = b"".join((_PREFIX.pack(MAGIC, VERSION, len(hb)), hb, *chunks))
    sig = bytes(_SIG)
    if keys is not None:
        mac = keys.signer()
        mac.update(body)
        sig = keys.signing_id + mac.digest()
    return body + hashlib.sha256(body).digest() + sig


def save_state(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model_fingerprint: str,
    codec_fingerprint: str,
    keys: StateKeys | None = None,
) -> Path:
    """Write a state file atomically (signed with `keys` when given); returns its path."""
    data = encode_state(tensors, meta, model_fingerprint, codec_fingerprint, keys)
    return write_atomic(path, data)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it: a full disk or a crash
    never leaves a half-written state in place of a good one."""
    path = Path(path)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"could not write state file {path}: {e.strerror}") from e
    return path


def _remove_orphans(path: Path) -> None:
    """Delete temporary files a killed writer left beside `path` (its process is gone)."""
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                tmp.unlink()


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


StateSource = str | os.PathLike | bytes | bytearray | memoryview


def read_header(source: StateSource) -> dict[str, Any]:
    """The header of a state file or its bytes (validated like `load_state`, fingerprints not
    checked)."""
    return _parse(_bytes(source), _label(source), None, False)[0]


def _label(source: StateSource) -> str:
    return "the state" if isinstance(source, bytes | bytearray | memoryview) else str(source)


def _bytes(source: StateSource) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"state file {path} does not exist") from None
    except OSError as e:
        raise StateFileError(f"cannot read state file {path}: {e.strerror}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a state file may hold")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse(
    data: bytes, label: str, keys: StateKeys | None, require_signature: bool
) -> tuple[dict[str, Any], bytes, bool]:
    """Validate a whole state file; returns (header, payload, signed by one of `keys`)."""
    if len(data) < _PREFIX.size + 32:
        raise StateFileError(f"{label} is too short to be a duplex state file ({len(data)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StateFileError(f"{label} is not a duplex state file (bad magic {magic[:8]!r})")
    if version not in _READS:
        raise StateFileError(
            f"{label} is state format version {version}; this duplex reads versions "
            f"{', '.join(map(str, _READS))}"
        )
    tail = 32 + (_SIG if version >= 2 else 0)
    if len(data) < _PREFIX.size + tail:
        raise StateFileError(f"{label} is truncated ({len(data)} bytes)")
    body, digest = data[: len(data) - tail], data[len(data) - tail : len(data) - tail + 32]
    sig = data[len(data) - tail + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{label} is corrupt or truncated (checksum mismatch)")
    signed = keys is not None and len(sig) == _SIG and keys.verify(body, sig)
    if require_signature and not signed:
        raise StateFileError(
            f"{label} is not signed by this server: it accepts only the states it handed out"
        )
    start = _PREFIX.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(body):
        raise StateFileError(f"{label} is truncated (header runs past the end)")
    try:
        header = json.loads(body[start : start + hlen].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateFileError(f"{label} has an unreadable header: {str(e)[:200]}") from None
    payload = body[start + hlen :]
    _check_header(header, len(payload), label)
    return header, payload, signed


def _check_header(header: Any, payload_len: int, label: str) -> None:
    """Types and bounds of every header field the loader relies on."""

    def bad(what: str) -> StateFileError:
        return StateFileError(f"{label}: header {what}")

    if not isinstance(header, dict):
        raise bad("is not a JSON object")
    for key in ("model_fingerprint", "codec_fingerprint"):
        v = header.get(key)
        if not isinstance(v, str) or not _FINGERPRINT.match(v):
            raise bad(f"field {key} is missing or not a fingerprint")
    if not isinstance(header.get("meta"), dict):
        raise bad("field meta is missing or not an object")
    index = header.get("tensors")
    if not isinstance(index, list) or len(index) > MAX_TENSORS:
        raise bad(f"field tensors is missing, not a list, or longer than {MAX_TENSORS}")
    names = set()
    for n, e in enumerate(index):
        if not isinstance(e, dict):
            raise bad(f"tensor entry {n} is not an object")
        name = e.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise bad(f"tensor entry {n} has a missing, malformed or repeated name")
        names.add(name)
        dtype, shape, offset, nbytes = (e.get(k) for k in ("dtype", "shape", "offset", "nbytes"))
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)
        ):
            raise bad(f"tensor {name!r} has a malformed shape")
        if not _is_int(offset) or not _is_int(nbytes) or offset < 0 or nbytes < 0:
            raise bad(f"tensor {name!r} has a malformed offset or size")
        itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if math.prod(shape) * itemsize != nbytes:
            raise StateFileError(
                f"{label}: tensor {name!r} declares shape {shape} but holds {nbytes} bytes"
            )
        if offset + nbytes > payload_len:
            raise StateFileError(f"{label}: tensor {name!r} is out of bounds")


def load_state(
    source: StateSource,
    model_fingerprint: str | None = None,
    codec_fingerprint: str | None = None,
    *,
    keys: StateKeys | None = None,
    require_signature: bool = False,
    label: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a state file, or a state file's bytes; returns (tensors, meta).

    With fingerprints given, a state saved for another model or codec is a StateFileError.
    With `require_signature`, so is a state not signed by one of `keys`. `label` names the file
    in error messages instead of its path (a server does not show its temporary paths).
    """
    label = label or _label(source)
    header, payload, _ = _parse(_bytes(source), label, keys, require_signature)
    for what, want in (("model", model_fingerprint), ("codec", codec_fingerprint)):
        have = header[f"{what}_fingerprint"]
        if want is not None and have != want:
            raise StateFileError(
                f"{label} was saved for a different {what} (fingerprint {have}, "
                f"this {what} is {want}); load it with the {what} that saved it"
            )
    tensors = {}
    for e in header["tensors"]:
        dtype = _DTYPES[e["dtype"]]
        if e["nbytes"] == 0:
            # Zero elements (checked against the size): nothing to allocate.
            tensors[e["name"]] = torch.empty(e["shape"], dtype=dtype)
            continue
        raw = np.frombuffer(payload, dtype=np.uint8, count=e["nbytes"], offset=e["offset"])
        tensors[e["name"]] = torch.from_numpy(raw.copy()).view(dtype).reshape(e["shape"])
    return tensors, header["meta"]
