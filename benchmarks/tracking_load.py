"""Tracking load: parallel trainings' per-epoch flushes through a tracking server, and the embedded
SQLite store, while readers poll it.

    python benchmarks/tracking_load.py --uri http://127.0.0.1:5000 [--embedded]
        [--writers 8] [--epochs 20] [--batches 422] [--readers 2] [--read-interval 0.5]

Each writer is a process (spawn) that does what pipeline/train.py does, minus the training:
store.configure(), a run through tracking.run(), and per epoch `batch_accuracy`/`batch_loss`
for every batch plus accuracy/loss/val_accuracy/val_loss, sent by one MetricBuffer.flush(), which
is timed. 422 batches is full MNIST at batch_size 128 (54,000 training images after val_size 0.1).
Writers flush back to back, with no training in between: every writer flushing at once, the worst
case. As in train.py, nothing but configure() takes store_lock: flushes to SQLite run unlocked.
Each reader polls as `mlflow ui` does: search_runs on the experiment, then get_metric_history of
one run's `batch_loss` (one read). At the end every point must be in the store: with --uri it is a
server, with --embedded also `sqlite:///<tmp>/mlflow.db`. "wall s" runs from the moment every
process is ready (imports take seconds each) to the last flush. Prints a Markdown table; exits 1 if
a point is missing, a read failed or a writer failed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import store, tracking

BATCH_KEYS = ("batch_accuracy", "batch_loss")
EPOCH_KEYS = ("accuracy", "loss", "val_accuracy", "val_loss")
COLUMNS = ("store", "writers", "points per flush", "flush p50 ms", "flush p99 ms", "total points")
COLUMNS += ("points landed", "reads ok / failed", "wall s")
TIMEOUT = 300.0  # seconds a process waits for the others to start, or to end
Store = tuple[str, str, str]  # tracking URI, experiment name, root folder (DVC_ROOT)


def use_store(uri: str, experiment: str, root: str) -> str:
    """Point this process at the store as DVC's stage environment would; the experiment id."""
    os.environ |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    os.environ |= {"DVC_ROOT": root, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    # Ten processes importing MLflow at once can keep a server on a small machine from answering
    # within a stage's 5 s: this measures flushes, not that first check.
    store.SERVER_TIMEOUT = TIMEOUT
    return store.configure()  # under store_lock for SQLite, as in train.py


def ready(go: Event, stop: Event, out: Queue) -> bool:
    """Say this process is set up; wait for every other one. False: the load was called off."""
    out.put(("ready",))
    return go.wait(TIMEOUT) and not stop.is_set()


def write(store: Store, index: int, epochs: int, batches: int, go: Event, stop: Event, out: Queue):
    experiment_id = use_store(*store)
    rng, flushes, error = np.random.default_rng(index), [], ""
    with tracking.run(experiment_id, None, f"writer-{index}", {"writer": index}, {}) as run_id:
        log = tracking.MetricBuffer(run_id)
        if not ready(go, stop, out):
            return
        try:
            for epoch in range(epochs):
                for batch in range(batches):
                    for key in BATCH_KEYS:
                        log.add(key, rng.random(), epoch * batches + batch)
                for key in EPOCH_KEYS:
                    log.add(key, rng.random(), epoch)
                began = time.perf_counter()
                log.flush()  # no lock around it, as in train.py
                flushes.append(time.perf_counter() - began)
        except Exception as exc:  # reported; the missing points show at the end
            error = f"writer-{index} stopped: {exc!r}"
    out.put(("writer", run_id, flushes, error))


def read(store: Store, interval: float, go: Event, stop: Event, out: Queue) -> None:
    client = MlflowClient(store[0])
    experiment_id = client.get_experiment_by_name(store[1]).experiment_id
    if not ready(go, stop, out):
        return
    ok, failed, error = 0, 0, ""
    while not stop.is_set():
        try:
            runs = client.search_runs([experiment_id], max_results=100)
            client.get_metric_history(runs[(ok + failed) % len(runs)].info.run_id, "batch_loss")
            ok += 1
        except Exception as exc:
            failed += 1
            error = f"{failed} reads failed, the last with {exc!r}"
        stop.wait(interval)
    out.put(("reader", ok, failed, error))


def collect(out: Queue, processes: list[mp.process.BaseProcess], n: int) -> list[tuple]:
    """n messages from out; fewer as soon as one of the processes has ended without its own (a
    process that dies never sends it: waiting on would hang)."""
    results: list[tuple] = []
    while len(results) < n:
        ended = sum(p.exitcode is not None for p in processes)  # their messages are in out
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            if ended > len(results):
                break
    return results


def load(store: Store, args: argparse.Namespace) -> tuple[list[tuple], list[tuple], float]:
    """The writers' and the readers' results, and the seconds from start to the last flush."""
    ctx = mp.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    writers = [
        ctx.Process(target=write, args=(store, i, args.epochs, args.batches, go, stop, out))
        for i in range(args.writers)
    ]
    readers = [
        ctx.Process(target=read, args=(store, args.read_interval, go, stop, out))
        for _ in range(args.readers)
    ]
    for process in writers + readers:
        process.start()
    # Every process has started (imports: seconds each) and has its run; if one died on the
    # way (its traceback is above), call the load off rather than wait for it.
    if len(collect(out, writers + readers, len(writers + readers))) < len(writers + readers):
        stop.set()
        go.set()
        for process in writers + readers:  # a reader may be deep in MLflow's HTTP retries
            process.join(5)
            process.terminate()
        return [], [], 0.0
    go.set()
    began = time.perf_counter()
    written = collect(out, writers, args.writers)
    wall = time.perf_counter() - began
    stop.set()
    reads = collect(out, readers, args.readers)
    for process in writers + readers:
        process.join(TIMEOUT)
    return written, reads, wall


def check(uri: str, written: list[tuple], args: argparse.Namespace) -> tuple[int, list[str]]:
    """How many points the writers' runs hold; a problem for each key not logged once per step."""
    client, landed, problems = MlflowClient(uri), 0, []
    for _, run_id, _, _ in written:
        for key in BATCH_KEYS + EPOCH_KEYS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            landed += len(steps)
            if steps != list(range(args.epochs * (args.batches if key in BATCH_KEYS else 1))):
                problems.append(f"run {run_id}: {len(steps)} points of {key}, not one per step")
    return landed, problems


def measure(name: str, uri: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Run the load against one store: its table row, and what went wrong."""
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as root:
        experiment = f"tracking-load-{uuid.uuid4().hex[:8]}"
        store = (uri or f"sqlite:///{root}/mlflow.db", experiment, root)
        use_store(*store)  # the store and experiment exist before any reader or writer starts
        written, reads, wall = load(store, args)
        landed, problems = check(store[0], written, args)
    problems += [r[-1] for r in written + reads if r[-1]]
    if len(written) < args.writers or len(reads) < args.readers:
        problems.append("a writer or reader ended without a result (its traceback is above)")
    per_flush = args.batches * len(BATCH_KEYS) + len(EPOCH_KEYS)
    total = args.writers * args.epochs * per_flush
    ms = np.array([s for r in written for s in r[2]] or [np.nan]) * 1000
    ok, failed = sum(r[1] for r in reads), sum(r[2] for r in reads)
    row = [name, args.writers, per_flush, *(f"{p:.1f}" for p in np.percentile(ms, [50, 99]))]
    row += [f"{total:,}", f"{landed:,}", f"{ok} / {failed}", f"{wall:.1f}"]
    if landed != total:
        problems.append(f"{landed:,} of {total:,} points landed")
    return [str(x) for x in row], problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="a tracking server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--embedded", action="store_true", help="also a new SQLite mlflow.db")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batches", type=int, default=422, help="batches per epoch")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--read-interval", type=float, default=0.5, help="seconds between reads")
    args = parser.parse_args()
    stores = [("server", args.uri)] * bool(args.uri) + [("embedded SQLite", "")] * args.embedded
    if not stores:
        parser.error("give --uri, --embedded or both")
    rows, problems = [], []
    for name, uri in stores:
        row, trouble = measure(name, uri, args)
        rows.append(row)
        problems += [f"{name}: {p}" for p in trouble]

    print(f"MLflow {mlflow.__version__}, {os.cpu_count()} cores\n")
    for row in (COLUMNS, ["---"] * len(COLUMNS), *rows):
        print(f"| {' | '.join(row)} |")
    for problem in problems:
        print(f"FAILED {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
