"""Training speed: the project's training path against stock Keras and PyTorch, on this machine.

    python benchmarks/bench.py --order rows --steps 200 --repeats 5
    python benchmarks/bench.py --order pixels --steps 20 --repeats 3
    python benchmarks/bench.py --cell gru --order pixels --steps 10 --repeats 3

The blog post's network (per-step Dense 128 -> LSTM 128 -> Dense 10, batch 128, Adam; --cell gru or
simple_rnn for the other cells) trained for a
fixed number of batches by each contender, in rounds whose order rotates so that machine noise
hits all alike; samples/s is the median over rounds. Contenders:
  project     pipeline.train.fit exactly as `dvc repro` runs it, MLflow logging every batch
  no-logging  the same loop with logging switched off (their ratio is the logging overhead)
  keras       stock keras.layers.LSTM (GRU, SimpleRNN) in a plain model.fit
  torch       torch.nn.LSTM (GRU, RNN) with the same shapes and optimizer (if torch is installed)
Every timed run is a fresh process (compilation excluded from the timing), so each contender
runs with its own thread settings: the project's as train.py sets them, the others' defaults.
Also: a large float32 matmul's GFLOP/s, the network's nominal GFLOP/s as a fraction of it (the
project's path does fewer FLOPs for the same function), and each contender's peak RSS.
Timing lives here, never in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
if sys.argv[1:3] == ["--worker", "torch"]:
    # PyTorch's triton crashes (SIGSEGV) when its LLVM loads after TensorFlow's: load it first.
    with contextlib.suppress(ImportError):
        import torch._dynamo  # what imports triton

from pipeline import fastrnn, tracking
from pipeline.checkpoint import TrainState
from pipeline.model import CELLS, build_model, score
from pipeline.params import Params
from pipeline.tf import keras, tf
from pipeline.train import fit

BATCH, UNITS, CLASSES = 128, 128, 10
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


class NoLogging:
    """Stands in for tracking.MetricBuffer: the loop without any logging."""

    seconds = 0.0

    def add(self, key: str, value: float, step: int) -> None:
        pass

    def flush(self, skip_logged: bool = False) -> None:
        pass


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def flops_per_sample(steps: int, features: int, cell: str) -> float:
    """Multiply-adds x 2 of one training sample: forward, and about twice that backward."""
    per_step = 2 * features * UNITS + 2 * (UNITS + UNITS) * GATES[cell] * UNITS
    return 3 * (steps * per_step + 2 * UNITS * CLASSES)


def matmul_gflops(n: int = 2048, repeats: int = 20) -> float:
    a = tf.random.normal((n, n))
    tf.linalg.matmul(a, a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        c = tf.linalg.matmul(a, a)
    c.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def project(x: np.ndarray, y: np.ndarray, cell: str, logging: bool) -> Callable[[], float]:
    """pipeline.train.fit for one epoch over x (steps x batch samples); returns seconds."""
    params = Params(train={"epochs": 1}, readouts=["state_h"])
    store = tempfile.mkdtemp(prefix="bench-mlflow-")

    def run() -> float:
        keras.utils.set_random_seed(0)
        model = build_model(x.shape[1], x.shape[2], cell, "state_h", UNITS, UNITS)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        step = fastrnn.make_train_step(model, optimizer, "state_h")
        step(x[:BATCH], y[:BATCH])  # trace outside the timing, as every contender does
        score(model, x[:BATCH], y[:BATCH])  # and the validation pass that ends the epoch
        data = {"x_train": x, "y_train": y, "x_val": x[:BATCH], "y_val": y[:BATCH]}
        state = TrainState(fingerprint="bench")
        if logging:
            import mlflow

            tracking.mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
            run_id = mlflow.MlflowClient().create_run("0").info.run_id
            log = tracking.MetricBuffer(run_id)
        else:
            log = NoLogging()
        start = time.perf_counter()
        fit(model, step, data, params, log, state, save=lambda: None, stop=lambda: False)
        return time.perf_counter() - start

    return run


def stock_keras(x: np.ndarray, y: np.ndarray, cell: str) -> Callable[[], float]:
    def run() -> float:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input(x.shape[1:]),
                keras.layers.Dense(UNITS),
                CELLS[cell](UNITS),
                keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x[: 2 * BATCH], y[: 2 * BATCH], batch_size=BATCH, verbose=0)  # trace
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
        return time.perf_counter() - start

    return run


def pytorch(x: np.ndarray, y: np.ndarray, cell: str) -> Callable[[], float] | None:
    try:
        import torch._dynamo  # what imports triton
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)  # as TensorFlow's default

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(x.shape[2], UNITS)
            rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "simple_rnn": torch.nn.RNN}
            self.rnn = rnn[cell](UNITS, UNITS, batch_first=True)
            self.out = torch.nn.Linear(UNITS, CLASSES)

        def forward(self, s: torch.Tensor) -> torch.Tensor:
            _, h = self.rnn(self.proj(s))
            return self.out((h[0] if cell == "lstm" else h)[-1])

    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def run() -> float:
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        order = torch.randperm(len(yt))
        start = time.perf_counter()
        for i in range(0, len(yt), BATCH):
            idx = order[i : i + BATCH]
            logits = net(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            (logits.argmax(1) == yt[idx]).float().mean().item()  # batch accuracy, as ours
        return time.perf_counter() - start

    return run


CONTENDERS = ["project", "no-logging", "keras", "torch"]


def worker(name: str, cell: str, steps: int, features: int, batches: int) -> None:
    """One timed run of one contender, in this process; prints its result as JSON."""
    if name in ("project", "no-logging"):
        fastrnn.configure_threads()  # exactly as train.py
    if name == "matmul":
        print(json.dumps({"gflops": matmul_gflops()}))
        return
    rng = np.random.default_rng(0)
    x = rng.random((batches * BATCH, steps, features), dtype=np.float32)
    y = rng.integers(0, CLASSES, len(x)).astype(np.int32)
    keras.config.disable_interactive_logging()
    if name == "torch":
        run = pytorch(x, y, cell)
        if run is None:
            print(json.dumps({"missing": "torch is not installed: pip install -e '.[bench]'"}))
            return
    elif name == "keras":
        run = stock_keras(x, y, cell)
    else:
        run = project(x, y, cell, logging=name == "project")
    seconds = run()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_second": len(x) / seconds, "rss_mib": rss}))


def spawn(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--order", args.order, "--cell", args.cell]
    cmd += ["--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=["rows", "pixels"], default="rows")
    parser.add_argument("--cell", choices=list(CELLS), default="lstm")
    parser.add_argument("--steps", type=int, default=200, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (median reported)")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps, features = (28, 28) if args.order == "rows" else (784, 1)
    if args.worker:
        worker(args.worker, args.cell, steps, features, args.steps)
        return

    names = [name for name in CONTENDERS if name in args.contenders.split(",")]
    rates: dict[str, list[float]] = {name: [] for name in names}
    rss: dict[str, float] = {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            result = spawn(name, args)
            if "missing" in result:
                print(f"{name}: {result['missing']}")
                names.remove(name)
                del rates[name]
                continue
            rates[name].append(result["samples_per_second"])
            rss[name] = max(rss.get(name, 0.0), result["rss_mib"])
            print(f"round {r + 1}: {name:10s} {rates[name][-1]:8,.0f} samples/s")

    peak = spawn("matmul", args)["gflops"]
    flops = flops_per_sample(steps, features, args.cell)
    rate = {name: statistics.median(values) for name, values in rates.items()}
    # Ratios as the median of per-round ratios: noise that hits one round hits both sides.
    ratio = {
        (a, b): statistics.median(p / q for p, q in zip(rates[a], rates[b], strict=True))
        for a in rates
        for b in rates
    }
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, TF {tf.__version__}, Keras {keras.__version__}")
    print(
        f"cell {args.cell}, order {args.order} (T={steps}, F={features}), {args.steps} batches of {BATCH}, "
        f"median of {args.repeats}; matmul peak {peak:,.0f} GFLOP/s"
    )
    print("| contender | samples/s | vs keras | vs torch | nominal GFLOP/s | of peak | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, value in rate.items():
        gflops = value * flops / 1e9
        vs = {b: f"{ratio[name, b]:.2f}x" if b in rates else "-" for b in ("keras", "torch")}
        print(
            f"| {name} | {value:,.0f} | {vs['keras']} | {vs['torch']} | {gflops:.1f} "
            f"| {gflops / peak:.1%} | {rss[name]:,.0f} MiB |"
        )
    if {"project", "no-logging"} <= rates.keys():
        overhead = ratio["no-logging", "project"] - 1
        print(f"\nlogging overhead: {overhead:+.1%} (no-logging / project, median of rounds)")


if __name__ == "__main__":
    main()
