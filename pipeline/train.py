"""Stage 3, train (once per readout): data/prepared/ -> models/<readout>/ and logs/<readout>/.

Writes model.keras and run.json (the MLflow run id that evaluate logs into) under models/<readout>/,
and the per-batch and per-epoch curves as CSV under logs/<readout>/ for `dvc plots show`.
MLflow gets every param, the tags, `batch_accuracy`/`batch_loss` (the accuracy and loss of that
one batch, not Keras's running mean), per-epoch accuracy/loss/val_accuracy/val_loss, and the model.
A killed run resumes from checkpoints/<readout>/ into the same MLflow run.
Initial weights and batch shuffling are drawn from the training seed (train.seed, or seed when it is
null); the run is tagged with it and with replicate_of, which names its configuration without it.
Params: seed, model, train.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from pipeline import checkpoint, fastrnn, store, tracking
from pipeline import params as P
from pipeline.checkpoint import Interrupted, TrainState
from pipeline.io import atomic_path, load_npz, read_json, write_csv, write_json
from pipeline.model import build_model, score
from pipeline.stage import LOGS, MODELS, PREPARED, need_space, run_stage
from pipeline.tf import keras, tf
from pipeline.trial import Trial

# the columns of logs/<readout>/epochs.csv
EPOCH_HEADER = ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a fresh shuffle drawn from (seed, epoch)."""
    order = np.random.default_rng([seed, 2, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def make_optimizer(cfg: P.TrainParams, samples: int, steps: int = 1) -> keras.optimizers.Optimizer:
    """Adam with train.lr, optionally decayed (cosine, to 0 at the last update) and clipped."""
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.lr
    if cfg.lr_schedule == "cosine":
        chunks = -(-steps // cfg.tbptt_steps) if cfg.tbptt_steps else 1  # updates per batch
        total = cfg.epochs * -(-samples // cfg.batch_size) * chunks  # updates in the whole run
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total)
    return keras.optimizers.Adam(learning_rate=lr, global_clipnorm=cfg.global_clipnorm)


def space_needed(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, cfg: P.TrainParams, samples: int
) -> int:
    """Bytes that training writes to the project's disk, about (measured on small and default runs):
    the checkpoint twice while it is replaced, the model with its optimizer in models/ and mlruns/,
    ~500 bytes per metric point (in mlflow.db and the checkpoint), 1 MB of MLflow's files, and 1 MB
    more for a new mlflow.db."""
    values = model.count_params() + sum(int(np.prod(v.shape)) for v in optimizer.variables)
    batches = cfg.epochs * -(-samples // cfg.batch_size)
    points = 2 * batches // cfg.log_every_n_batches + 4 * cfg.epochs
    db = store.project_root() / "mlflow.db"
    new_store = not db.is_file() or db.stat().st_size == 0
    return 4 * 4 * values + 500 * points + 2**20 * (1 + new_store)


def fit(
    model: keras.Model,
    train_step: Callable[[np.ndarray, np.ndarray], tuple[tf.Tensor, tf.Tensor]],
    data: dict[str, np.ndarray],
    params: P.Params,
    log: tracking.MetricBuffer,
    state: TrainState,
    save: Callable[[], None],
    stop: Callable[[], bool],
    trial: Trial | None = None,
) -> bool:
    """Train from `state` to params.train.epochs, updating `state` as it goes.

    Calls save() after every epoch, and after the current batch when stop() turns true. A trial
    of a study reports every epoch; True if its pruner stopped training early.
    """
    cfg, seed = params.train, params.train_seed
    x_train, y_train = data["x_train"], data["y_train"]

    while state.epoch < cfg.epochs:
        epoch = state.epoch
        batches = epoch_batches(len(y_train), cfg.batch_size, seed, epoch)
        # On a terminal, a bar with the live batch accuracy (the post printed it every 200 steps);
        # in logs and CI (not a terminal) nothing but the line per epoch below.
        bar = tqdm(
            batches[state.batch :],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            total=len(batches),
            initial=state.batch,
            unit="batch",
            leave=False,
            disable=None,
        )
        for idx in bar:
            loss, acc = (float(t) for t in train_step(x_train[idx], y_train[idx]))
            state.samples += len(idx)
            state.loss_sum += loss * len(idx)
            state.hits += acc * len(idx)
            if state.step % cfg.log_every_n_batches == 0:
                log.add("batch_accuracy", acc, state.step)
                log.add("batch_loss", loss, state.step)
                state.batch_rows.append([state.step, acc, loss])
            bar.set_postfix(batch_accuracy=f"{acc:.3f}", loss=f"{loss:.3f}", refresh=False)
            state.step += 1
            state.batch += 1
            if stop():
                save()
                raise Interrupted
        val_loss, val_acc, _ = score(model, data["x_val"], data["y_val"])
        row = {
            "accuracy": state.hits / state.samples,
            "loss": state.loss_sum / state.samples,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
        }
        for key, value in row.items():
            log.add(key, value, epoch)
        state.epoch_rows.append([epoch, *row.values()])
        state.next_epoch()
        save()  # before sending: a kill in between re-sends only the points the store lacks
        log.flush()
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
        )
        if trial and trial.report(epoch, row, last=state.epoch == cfg.epochs):
            print(f"trial {trial.number} of study {trial.study}: pruned after epoch {epoch + 1}")
            return True
    return False


def train(readout: str) -> None:
    fastrnn.configure_threads()
    params = P.load()
    params.check_readout(readout)
    data = load_npz(PREPARED / "sequences.npz", ("x_train", "y_train", "x_val", "y_val"))
    meta = read_json(PREPARED / "meta.json")
    _, steps, features = data["x_train"].shape

    keras.config.disable_interactive_logging()  # no progress bars from predict() calls
    keras.utils.set_random_seed(params.train_seed)  # weights (and dropout, had the model any)
    tf.config.experimental.enable_op_determinism()
    m = params.model
    model = build_model(
        steps, features, m.cell, readout, m.input_units, m.units, m.unit_forget_bias
    )
    optimizer = make_optimizer(params.train, len(data["y_train"]), steps)
    optimizer.build(model.trainable_variables)  # its variables exist from the start: checkpointable
    need_space("train", space_needed(model, optimizer, params.train, len(data["y_train"])))
    experiment_id = store.configure()  # fails here, before training, if the store is unusable
    # One trainer per readout and checkpoint folder: a second one (say after `kill -9` of `dvc`
    # alone, whose trainer trains on as an orphan) would resume into the same MLflow run.
    with checkpoint.only_trainer(readout):
        tracking.end_abandoned(experiment_id)
        train_locked(readout, params, data, meta, model, optimizer, experiment_id)


def train_locked(
    readout: str,
    params: P.Params,
    data: dict[str, np.ndarray],
    meta: dict,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    experiment_id: str,
) -> None:
    """train() once it holds the readout's lock: resume or start, fit, write the outputs."""
    m = params.model
    ckpt_path = checkpoint.path_for(readout)
    fp = checkpoint.fingerprint(params, readout, meta["sha256"])
    state, stale_run = checkpoint.start_or_resume(ckpt_path, fp, model, optimizer)
    tracking.mark_killed(stale_run)  # its params or data changed: it can never be finished
    flat = params.flat()
    tags = tracking.run_tags(readout, meta) | {"model.cell": m.cell}
    tags |= {  # as logged: replicate_key reads the str params that report reads back
        "replicate_of": tracking.replicate_key(
            {k: str(v) for k, v in flat.items()}, readout, meta["sha256"]
        ),
        "train.seed": str(params.train_seed),
    }
    run_name = f"{m.cell}-{meta['order']}-{readout}"
    if trial := Trial.from_env():  # a study's trial (pipeline/study.py)
        tags |= trial.tags()
        run_name = f"{trial.study}-{trial.number}"
    with tracking.run(experiment_id, state.run_id, run_name, flat, tags) as run_id:
        state.run_id = run_id
        log = tracking.MetricBuffer(run_id)
        log.restore(state.pending)
        log.flush(skip_logged=True)  # what a killed run had not sent yet
        started = time.perf_counter()

        def save() -> None:
            seconds = state.seconds + time.perf_counter() - started
            snapshot = dataclasses.replace(state, seconds=seconds, pending=log.dump())
            checkpoint.save(ckpt_path, model, optimizer, snapshot)

        save()  # from the first moment on, a kill resumes into this same run
        with checkpoint.stop_on_signals() as stop_requested:
            train_step = fastrnn.make_train_step(
                model, optimizer, readout, params.train.tbptt_steps
            )
            pruned = fit(model, train_step, data, params, log, state, save, stop_requested, trial)
        state.seconds += time.perf_counter() - started
        write_outputs(readout, model, data, state, log.seconds, experiment_id, pruned)
        if trial:  # the study reads the result; the run is tagged COMPLETE or PRUNED, not FAILED
            last = dict(zip(EPOCH_HEADER, state.epoch_rows[-1], strict=True))
            trial.done(run_id, last, len(state.epoch_rows), pruned)
    shutil.rmtree(ckpt_path.parent, ignore_errors=True)


def write_outputs(
    readout: str,
    model: keras.Model,
    data: dict[str, np.ndarray],
    state: TrainState,
    logging_seconds: float,
    experiment_id: str,
    pruned: bool = False,
) -> None:
    """Log the cost and the model to MLflow; write models/<readout>/ and logs/<readout>/.

    logs/<readout>/metrics.json holds the last epoch's validation scores, for `dvc exp show`
    (a study's objective): the test set is evaluate's alone.
    """
    seconds, samples = state.seconds, len(data["y_train"]) * len(state.epoch_rows)
    tracking.log_cost(seconds, samples, logging_seconds)
    model_uri = tracking.log_model(model, data["x_train"][:2])
    run = {"run_id": state.run_id, "experiment_id": experiment_id, "model_uri": model_uri}
    run |= {"readout": readout, "train_seconds": seconds, "samples": samples}
    with atomic_path(MODELS / readout, directory=True) as tmp:
        model.save(tmp / "model.keras")
        write_json(tmp / "run.json", run)
    batch_header = ["step", "batch_accuracy", "batch_loss"]
    write_csv(LOGS / readout / "batches.csv", batch_header, state.batch_rows)
    write_csv(LOGS / readout / "epochs.csv", EPOCH_HEADER, state.epoch_rows)
    last = dict(zip(EPOCH_HEADER, state.epoch_rows[-1], strict=True))
    scores = {"val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"]}
    epochs = {"epochs": len(state.epoch_rows), "pruned": pruned}
    write_json(LOGS / readout / "metrics.json", scores | epochs)
    print(
        f"train {readout}: {seconds:.1f} s, {samples / seconds:,.0f} samples/s, run {run['run_id']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readout", required=True, choices=list(P.CELL_READOUTS["lstm"]))
    readout = parser.parse_args(argv).readout
    try:
        train(readout)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; the run is marked KILLED
        print(f"train {readout}: interrupted; checkpoint kept, `dvc repro` resumes the run")
        sys.exit(130)


if __name__ == "__main__":
    run_stage(main)
