"""Reading and writing files: atomic outputs, pickle-free arrays, IDX, JSON and CSV."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it into place only if the block succeeds.

    Readers never see a half-written file or folder, and a failure leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=path.suffix)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path | str, header: list[str], rows: Iterable[Iterable[object]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def load_npz(path: Path | str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays of an .npz, refusing pickled objects and missing keys."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; found {sorted(npz.files)}")
            return {k: npz[k] for k in keys}
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except ValueError as exc:  # pickled object arrays, corrupt or truncated zip members
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read without pickle or is corrupt ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def idx_dims(data: bytes, name: str) -> tuple[int, ...]:
    """The dims an IDX file's header declares (MNIST's format: unsigned bytes, labels or images).

    Magic: two zero bytes, type 0x08 (unsigned byte), number of dims (1 labels, 3 images); then
    each dim as a big-endian uint32, then the values. Errors name `name` and what is wrong.
    """
    magic = data[:4].hex()
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{name}: not an IDX file (bad magic {magic})")
    if data[2] != 0x08:
        raise DataError(f"{name}: IDX data not of unsigned bytes (bad magic {magic})")
    ndim = data[3]
    if ndim not in (1, 3):
        raise DataError(
            f"{name}: IDX of {ndim} dims, neither labels nor images (bad magic {magic})"
        )
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: IDX header cut short ({len(data)} bytes)")
    return tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """The array in an IDX file's bytes, checked against the dims its header declares."""
    dims = idx_dims(data, name)
    body = data[4 + 4 * len(dims) :]
    if len(body) != math.prod(dims):  # Python's ints: dims of 2**32 each overflow no int64
        raise DataError(f"{name}: header says {dims} = {math.prod(dims)} bytes, has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def sha256_of(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npz(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)
