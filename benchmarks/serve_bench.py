"""Serving latency: the registered image model against MLflow's stock Keras pyfunc, same network.

    python benchmarks/serve_bench.py [--calls 200] [--http-calls 200]

Both wrap the default network (Dense 128 -> LSTM 128 -> Dense 10 on 28 rows of 28 pixels; random
weights: latency does not depend on training). "image model" is pipeline/image_model.py as the
register stage logs it (images in, probabilities and class out, one compiled call); "stock keras"
is mlflow.keras's pyfunc of the same network (sequences in, logits out, model.predict per call).
Each is timed in process through mlflow.pyfunc and over HTTP through `mlflow models serve`
(JSON {"inputs": ...}), for one image and for a batch of 128; calls alternate between the two
models and the figures are the p50 and p99 of every call. "image model, PNG files" is the image
model sent bundled test digits as 140 px black-on-white PNG files (base64 strings), which it converts
as predict does. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import mlflow

from pipeline import register, tracking
from pipeline.datasets import bundled
from pipeline.model import build_model
from pipeline.packaging import sequence_index
from pipeline.tf import keras

PNG = "image model, PNG files"


def log_models(root: Path) -> dict[str, str]:
    """Log both models of one network into a store under root; their URIs."""
    os.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    keras.utils.set_random_seed(0)
    network = build_model(28, 28, "lstm", "state_h", 128, 128)
    (root / "models/state_h").mkdir(parents=True)
    network.save(root / "models/state_h/model.keras")
    example = np.zeros((2, 28, 28), np.float32)
    with mlflow.start_run() as run:
        stock = tracking.log_model(network, example)
    image = register.log_image_model(
        "state_h", run.info.run_id, sequence_index("rows", 0), "mnist", example
    )
    return {"image model": image, "stock keras": stock}


def drawing(image: np.ndarray) -> str:
    """The image as a user's 140 px black-on-white PNG file, base64: what a client sends."""
    big = Image.fromarray(255 - image.astype(np.uint8)).resize((140, 140), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}"


def timed(calls: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Call each function n times, alternating, after 5 warm-up calls each."""
    for call in calls.values():
        for _ in range(5):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def serve(uri: str, port: int, root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with (root / f"server-{port}.log").open("w") as log:  # the child keeps its own handle
        server = subprocess.Popen(
            command,
            cwd=root,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve {uri} did not start")


def post(port: int, body: bytes) -> Callable[[], object]:
    def call() -> object:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case in process")
    parser.add_argument(
        "--http-calls", type=int, default=200, help="timed calls per case over HTTP"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    uris = log_models(root)
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 256, (n, 28, 28)).astype(np.float32) for n in (1, 128)}
    # The stock model reads sequences: for rows, the image scaled to [0, 1] is the sequence.
    inputs = {"image model": images, "stock keras": {n: x / 255 for n, x in images.items()}}
    digits = bundled()["x_test"][:128]  # drawn digits: noise would make larger files
    inputs[PNG] = {n: np.array([drawing(x) for x in digits[:n]], dtype=object) for n in (1, 128)}
    rows = []

    models = {name: mlflow.pyfunc.load_model(uri) for name, uri in uris.items()}
    models[PNG] = models["image model"]
    # The stock model prints a Keras progress bar on every call: to /dev/null here, for both.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        for n in (1, 128):
            calls = {
                name: (lambda m=m, x=inputs[name][n]: m.predict(x)) for name, m in models.items()
            }
            for name, seconds in timed(calls, args.calls).items():
                rows.append((name, "in process (mlflow.pyfunc)", n, percentiles(seconds)))

    servers = {name: serve(uri, 5100 + i, root) for i, (name, uri) in enumerate(uris.items())}
    ports = {name: 5100 + i for i, name in enumerate(uris)} | {PNG: 5100}
    started = {p: p.stat().st_size for p in root.glob("server-*.log")}  # after start-up
    try:
        for n in (1, 128):
            calls = {
                name: post(ports[name], json.dumps({"inputs": inputs[name][n].tolist()}).encode())
                for name in inputs
            }
            for name, seconds in timed(calls, args.http_calls).items():
                rows.append((name, "HTTP (mlflow models serve)", n, percentiles(seconds)))
    finally:
        for server in servers.values():
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    per_call = {p: p.read_bytes()[size:].decode(errors="replace") for p, size in started.items()}
    noise = {
        name: per_call[root / f"server-{5100 + i}.log"].count("/step")
        for i, name in enumerate(uris)
    }

    print(f"Keras {keras.__version__}, MLflow {mlflow.__version__}, {os.cpu_count()} cores")
    print("| model | path | batch | p50 / p99 ms |")
    print("|---|---|---|---|")
    for name, path, n, figures in rows:
        print(f"| {name} | {path} | {n} | {figures} |")
    print(f"\nKeras progress bars the servers printed while answering: {noise}")


if __name__ == "__main__":
    main()
