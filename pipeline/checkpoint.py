"""Training checkpoints: all that a killed run needs to resume exactly where it stopped.

One file per readout, checkpoints/<readout>/checkpoint.npz, replaced atomically (temp + rename):
the model weights, the optimizer's variables, and the TrainState as JSON (no pickle: it is stored
as a unicode string array). Also here: SIGINT/SIGTERM turned into a stop request that training
honours at the next batch boundary, and the lock that lets only one process train a readout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import params as P
from pipeline.io import load_npz, save_npz
from pipeline.stage import CHECKPOINTS, ConfigError, DataError

if TYPE_CHECKING:
    import keras


@dataclasses.dataclass
class TrainState:
    """Where training stands. Saved in every checkpoint, so that a killed run resumes exactly."""

    fingerprint: str  # the params and data this state belongs to
    run_id: str | None = None  # the MLflow run it logs into
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # batches finished in all: the step of batch metrics
    samples: int = 0  # this epoch so far: samples seen,
    loss_sum: float = 0.0  # the sum of their losses,
    hits: float = 0.0  # and how many were classified right
    batch_rows: list[list[float]] = dataclasses.field(default_factory=list)  # step, acc, loss
    epoch_rows: list[list[float]] = dataclasses.field(default_factory=list)  # epoch, metrics...
    seconds: float = 0.0  # training time spent before this process started
    pending: list[list] = dataclasses.field(default_factory=list)  # points not yet in MLflow

    def next_epoch(self) -> None:
        """Move to the start of the next epoch: no batch done yet, running sums at zero."""
        self.epoch, self.batch = self.epoch + 1, 0
        self.samples, self.loss_sum, self.hits = 0, 0.0, 0.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint was saved at a batch boundary."""


def path_for(readout: str) -> Path:
    return CHECKPOINTS / readout / "checkpoint.npz"


def fingerprint(params: P.Params, readout: str, data_sha256: str) -> str:
    """What a checkpoint belongs to: the train stage's params (dvc.yaml), readout and data."""
    what = {
        "seed": params.seed,
        "train_seed": params.train_seed,  # what training draws from (weights, shuffling)
        "model": params.model.model_dump(),
        "train": params.train.model_dump(),
    }
    what |= {"readout": readout, "data": data_sha256}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def save(
    path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: TrainState
) -> None:
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
    save_npz(path, state=np.array(json.dumps(dataclasses.asdict(state))), **arrays)


def read_state(path: Path) -> TrainState:
    """The state of a checkpoint; DataError if it is damaged."""
    text = str(load_npz(path, ("state",))["state"])
    try:
        return TrainState(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as exc:  # TypeError: another version's fields
        raise DataError(f"{path}: its training state is not readable ({exc})") from None


def restore(path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Load weights and optimizer variables in place (the optimizer must be built); DataError,
    with nothing changed, if the checkpoint is damaged."""
    n_weights, n_opt = len(model.weights), len(optimizer.variables)
    keys = tuple(f"w{i}" for i in range(n_weights)) + tuple(f"o{i}" for i in range(n_opt))
    arrays = load_npz(path, keys)
    targets = [*model.weights, *optimizer.variables]
    for key, target in zip(keys, targets, strict=True):
        if arrays[key].shape != tuple(target.shape):
            raise DataError(f"{path}: {key} has shape {arrays[key].shape}, not {target.shape}")
    model.set_weights([arrays[f"w{i}"] for i in range(n_weights)])
    for i, variable in enumerate(optimizer.variables):
        variable.assign(arrays[f"o{i}"])


def start_or_resume(
    path: Path, fp: str, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> tuple[TrainState, str | None]:
    """(state, stale run id): from a checkpoint of the same params and data, else fresh.

    The stale run id is that of a checkpoint that cannot be resumed: made for other params or
    data, or damaged (a file cut short, a bad CRC). Either way training starts over in a new run,
    with one line saying why, and the caller ends the stale run. Starting over loses nothing but
    time: training is deterministic, so it ends where the resumed run would have.
    """
    fresh = TrainState(fingerprint=fp)
    if not path.exists():
        return fresh, None
    state: TrainState | None = None
    try:
        state = read_state(path)
        if state.fingerprint != fp:
            print(f"checkpoint {path} is for other params or data: starting clean")
            return fresh, state.run_id
        restore(path, model, optimizer)
    except DataError as exc:
        print(
            f"warning: {exc}: the checkpoint is damaged; training starts over in a new MLflow run",
            file=sys.stderr,
        )
        return fresh, state.run_id if state else None
    print(f"resuming run {state.run_id} at epoch {state.epoch + 1}, batch {state.batch}")
    return state, None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a request that training honours at the next batch boundary."""
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


@contextlib.contextmanager
def only_trainer(readout: str) -> Iterator[None]:
    """Refuse, in one line naming its pid, while another process trains `readout` here.

    An OS lock (flock) on checkpoints/<readout>.lock: the kernel releases it when its process ends,
    even by kill -9, so it is never stale. The holder writes its pid into the file it locks (plain
    fcntl: filelock owns its file). The file stays when training ends: deleting a lock file that
    another process may have open could let two processes hold the lock.
    """
    path = CHECKPOINTS / f"{readout}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:  # a+: never truncates what the holder wrote
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            pid = file.read().strip() or "?"
            raise ConfigError(
                f"train {readout} is already running here as pid {pid} (it holds {path}): wait "
                f"for it to end, or stop it (kill {pid}; `dvc repro` then resumes its run)"
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
