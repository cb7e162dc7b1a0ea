"""Small data files the tests write: tiny Keras-layout .npz and IDX .gz sets with known pixels."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from helpers import make_params

from pipeline import params as P
from pipeline.datasets import IDX_FILES


def tiny_arrays(n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """A few images whose every pixel is known: pixel (i, r, c) of a split is (i*784+r*28+c)%251."""

    def images(n: int, offset: int) -> np.ndarray:
        return ((np.arange(n * 784) + offset) % 251).astype(np.uint8).reshape(n, 28, 28)

    return {
        "x_train": images(n_train, 0),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": images(n_test, 7),
        "y_test": ((np.arange(n_test) + 3) % 10).astype(np.uint8),
    }


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.write_bytes(npz_bytes(**arrays))
    return path


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An uncompressed IDX file of unsigned bytes: big-endian magic, dims, then the body."""
    if magic is None:
        magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    path.write_bytes(gzip.compress(idx_bytes(array)))
    return path


def idx_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The four gzipped IDX files of a data set, by their canonical names."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    return {
        name: gzip.compress(idx_bytes(arrays[k])) for name, k in zip(IDX_FILES, keys, strict=True)
    }


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in idx_files(arrays).items():
        (folder / name).write_bytes(data)
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == np.uint8, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def data_params(**data: Any) -> P.DataParams:
    return make_params({"data": data}).data


class Canary:
    """Unpickling this touches a file, so a test can tell whether anything was ever unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.path,))


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy header of uint8 declaring `shape`, to be followed by as many bytes as a test likes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG's signature, header and end, without pixels: all Pillow reads before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
