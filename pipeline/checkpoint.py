"""Training checkpoints: all that a killed run needs to resume exactly where it stopped.

One file per readout, checkpoints/<readout>/checkpoint.npz, replaced atomically (temp + rename):
the model weights, the optimizer's variables, and a JSON state (epoch, batch, step, running sums,
logged rows, metric points not yet sent, the MLflow run id, and the fingerprint of the params and
data it belongs to). No pickle: the state is stored as a unicode string array.
Also here: SIGINT/SIGTERM turned into a stop request honoured at the next batch boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np

from pipeline import params as P
from pipeline.io import DataError, load_npz, save_npz

ROOT = Path("checkpoints")  # not a DVC out: DVC deletes outs before it reruns a stage


def path_for(readout: str) -> Path:
    return ROOT / readout / "checkpoint.npz"


def fingerprint(params: P.Params, readout: str, data_sha256: str) -> str:
    """What a checkpoint belongs to: the params train reads, the readout and the exact data."""
    train = params.train.model_dump(exclude={"readouts"})
    what = {"seed": params.seed, "model": params.model.model_dump(), "train": train}
    what |= {"readout": readout, "data": data_sha256}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def save(
    path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: dict
) -> None:
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
    save_npz(path, state=np.array(json.dumps(state)), **arrays)


def read_state(path: Path) -> dict[str, Any] | None:
    """The JSON state of a checkpoint, or None if there is none or it cannot be read."""
    if not path.exists():
        return None
    try:
        return json.loads(str(load_npz(path, ("state",))["state"]))
    except (DataError, json.JSONDecodeError):
        return None


def restore(path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Load weights and optimizer variables in place (the optimizer must be built)."""
    n_weights, n_opt = len(model.weights), len(optimizer.variables)
    keys = tuple(f"w{i}" for i in range(n_weights)) + tuple(f"o{i}" for i in range(n_opt))
    arrays = load_npz(path, keys)
    model.set_weights([arrays[f"w{i}"] for i in range(n_weights)])
    for i, variable in enumerate(optimizer.variables):
        variable.assign(arrays[f"o{i}"])


def start_or_resume(
    ckpt_path: Path, fp: str, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> dict:
    """The training state: from a checkpoint of the same params and data, else fresh."""
    state = read_state(ckpt_path)
    if state is not None and state["fingerprint"] == fp:
        restore(ckpt_path, model, optimizer)
        print(
            f"resuming run {state['run_id']} at epoch {state['epoch'] + 1}, batch {state['batch']}"
        )
        return state
    if state is not None:  # params or data changed: the old run cannot be finished any more
        print(f"checkpoint {ckpt_path} is for other params or data: starting clean")
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.tracking.MlflowClient().set_terminated(state["run_id"], "KILLED")
    return {
        "fingerprint": fp,
        "run_id": None,
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "sums": [0, 0.0, 0.0],
        "batch_rows": [],
        "epoch_rows": [],
        "seconds": 0.0,
        "pending": [],
    }


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a request that fit() honours at the next batch boundary."""
    requested: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: requested.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield lambda: bool(requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
