"""Stage 3, train (once per readout): data/prepared/ -> models/<readout>/ and logs/<readout>/.

Writes model.keras and run.json (the MLflow run id that evaluate logs into) under models/<readout>/,
and the per-batch and per-epoch curves as CSV under logs/<readout>/ for `dvc plots show`.
MLflow gets every param, the tags, `batch_accuracy`/`batch_loss` (the accuracy and loss of that
one batch, not Keras's running mean), per-epoch accuracy/loss/val_accuracy/val_loss, and the model.
Params: seed, model.*, train.lr/lr_schedule/global_clipnorm/tbptt_steps/batch_size/epochs/
log_every_n_batches.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import Model, infer_signature

from pipeline import checkpoint, fastrnn, tracking
from pipeline import params as P
from pipeline.io import atomic_path, load_npz, read_json, run_stage, write_csv, write_json
from pipeline.model import build_model, score

PREPARED = Path("data/prepared")
MODELS = Path("models")
LOGS = Path("logs")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a fresh shuffle drawn from (seed, epoch)."""
    order = np.random.default_rng([seed, 2, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class _KerasWithExample:
    """mlflow.keras.save_model, into a folder created first.

    Works around mlflow#16183: log_model(input_example=...) writes the example before the model
    folder exists and fails with FileNotFoundError (MLflow 3.17-3.18).
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: object) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def make_optimizer(cfg: P.TrainParams, samples: int, steps: int = 1) -> keras.optimizers.Optimizer:
    """Adam with train.lr, optionally decayed (cosine, to 0 at the last update) and clipped."""
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.lr
    if cfg.lr_schedule == "cosine":
        chunks = -(-steps // cfg.tbptt_steps) if cfg.tbptt_steps else 1  # updates per batch
        total = cfg.epochs * -(-samples // cfg.batch_size) * chunks  # updates in the whole run
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total)
    return keras.optimizers.Adam(learning_rate=lr, global_clipnorm=cfg.global_clipnorm)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved at a batch boundary."""


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    readout: str,
    tbptt_steps: int | None = None,
) -> Callable[[np.ndarray, np.ndarray], tuple[tf.Tensor, tf.Tensor]]:
    """One compiled Adam step on a batch; returns (loss, accuracy) of that batch.

    With tbptt_steps k shorter than the sequence: one Adam step per chunk of k steps, each chunk
    starting from the state the previous chunk of the same images ended in (no gradient through
    it), zeros for a new batch; loss and accuracy are those of the last chunk, the whole image.
    """
    _, steps, features = model.input.shape
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    spec = (tf.TensorSpec([None, steps, features], tf.float32), tf.TensorSpec([None], tf.int32))
    forward = fastrnn.logits_fn(model, readout)  # model(x), computed faster
    k = tbptt_steps or steps
    chunks = [(i, min(i + k, steps)) for i in range(0, steps, k)]
    if len(chunks) > 1:
        stateful = fastrnn.stateful_fn(model, readout)

    def update(x: tf.Tensor, y: tf.Tensor, state: tuple) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape() as tape:
            if state:
                logits, *state = stateful(x, *state)
            else:
                logits = forward(x)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return logits, loss, tuple(tf.stop_gradient(s) for s in state)

    @tf.function(input_signature=spec)
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        state: tuple = ()
        if len(chunks) > 1:
            zeros = tf.zeros([tf.shape(x)[0], model.get_layer("rnn").units])
            state = (zeros,) * fastrnn.n_states(model)  # (h, c) for an LSTM, (h,) otherwise
        for start, stop in chunks:
            logits, loss, state = update(x[:, start:stop], y, state)
        # The accuracy of this batch alone, from the forward pass that made the gradient.
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    return train_step


def fit(
    model: keras.Model,
    train_step: Callable[[np.ndarray, np.ndarray], tuple[tf.Tensor, tf.Tensor]],
    data: dict[str, np.ndarray],
    params: P.Params,
    log: tracking.MetricBuffer,
    state: dict,
    save: Callable[[], None],
    stop: Callable[[], bool],
) -> None:
    """Train from `state` (epoch, batch, step, sums, rows) to params.train.epochs.

    Calls save() after every epoch, and after the current batch when stop() turns true.
    """
    cfg, seed = params.train, params.seed
    x_train, y_train = data["x_train"], data["y_train"]

    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        batches = epoch_batches(len(y_train), cfg.batch_size, seed, epoch)
        for idx in batches[state["batch"] :]:
            loss, acc = (float(t) for t in train_step(x_train[idx], y_train[idx]))
            sums = state["sums"]  # samples, loss * samples, hits
            state["sums"] = [
                sums[0] + len(idx),
                sums[1] + loss * len(idx),
                sums[2] + acc * len(idx),
            ]
            if state["step"] % cfg.log_every_n_batches == 0:
                log.add("batch_accuracy", acc, state["step"])
                log.add("batch_loss", loss, state["step"])
                state["batch_rows"].append([state["step"], acc, loss])
            state["step"] += 1
            state["batch"] += 1
            if stop():
                save()
                raise Interrupted
        val_loss, val_acc, _ = score(model, data["x_val"], data["y_val"])
        n, loss_sum, hits = state["sums"]
        row = {
            "accuracy": hits / n,
            "loss": loss_sum / n,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
        }
        for key, value in row.items():
            log.add(key, value, epoch)
        state["epoch_rows"].append([epoch, *row.values()])
        state.update(epoch=epoch + 1, batch=0, sums=[0, 0.0, 0.0])
        save()  # before sending: a kill in between re-sends only the points the store lacks
        log.flush()
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
        )


def train(readout: str) -> None:
    fastrnn.configure_threads()
    params = P.load()
    params.check_readout(readout)
    data = load_npz(PREPARED / "sequences.npz", ("x_train", "y_train", "x_val", "y_val"))
    meta = read_json(PREPARED / "meta.json")
    _, steps, features = data["x_train"].shape
    experiment_id = tracking.configure()  # fails here, before training, if the store is unusable

    keras.config.disable_interactive_logging()  # no progress bars from predict() calls
    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    m = params.model
    model = build_model(
        steps, features, m.cell, readout, m.input_units, m.units, m.unit_forget_bias
    )
    optimizer = make_optimizer(params.train, len(data["y_train"]), steps)
    optimizer.build(model.trainable_variables)  # its variables exist from the start: checkpointable

    ckpt_path = checkpoint.path_for(readout)
    fp = checkpoint.fingerprint(params, readout, meta["sha256"])
    state = checkpoint.start_or_resume(ckpt_path, fp, model, optimizer)
    run_name = f"{m.cell}-{meta['order']}-{readout}"
    run = mlflow.start_run(run_id=state["run_id"], experiment_id=experiment_id, run_name=run_name)
    state["run_id"] = run.info.run_id
    started = time.perf_counter()
    try:
        log = tracking.MetricBuffer(run.info.run_id)
        log.restore(state.pop("pending"))
        log.flush(skip_logged=True)  # what a killed run had not sent yet

        def save() -> None:
            seconds = state["seconds"] + time.perf_counter() - started
            snapshot = {**state, "seconds": seconds, "pending": log.dump()}
            checkpoint.save(ckpt_path, model, optimizer, snapshot)

        mlflow.log_params({k: str(v) for k, v in params.flat().items()})
        mlflow.set_tags(tracking.run_tags(readout, meta) | {"model.cell": m.cell})
        save()  # from the first moment on, a kill resumes into this same run
        with checkpoint.stop_on_signals() as stop_requested:
            train_step = make_train_step(model, optimizer, readout, params.train.tbptt_steps)
            fit(model, train_step, data, params, log, state, save, stop_requested)
        state["seconds"] += time.perf_counter() - started
        write_outputs(readout, model, data, state, log.seconds, experiment_id)
    except (Interrupted, KeyboardInterrupt):  # the latter outside fit(), e.g. while logging
        mlflow.end_run("KILLED")
        print(f"train {readout}: interrupted; checkpoint kept, `dvc repro` resumes the run")
        sys.exit(130)
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    shutil.rmtree(ckpt_path.parent, ignore_errors=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory; ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def write_outputs(
    readout: str,
    model: keras.Model,
    data: dict[str, np.ndarray],
    state: dict,
    logging_seconds: float,
    experiment_id: str,
) -> None:
    """Log the timing and the model to MLflow; write models/<readout>/ and logs/<readout>/."""
    seconds, samples = state["seconds"], len(data["y_train"]) * len(state["epoch_rows"])
    mlflow.log_metrics(
        {
            "train_seconds": seconds,
            "samples_per_second": samples / seconds,
            "logging_seconds": logging_seconds,  # time spent sending metrics, within train_seconds
            "peak_rss_mib": peak_rss_mib(),
        }
    )
    example = data["x_train"][:2]
    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasWithExample,
        flavor_name="keras",
        model=model,
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        # Given, not inferred: inference re-imports the model in a subprocess (~10 s).
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )
    run = {"run_id": state["run_id"], "experiment_id": experiment_id, "model_uri": info.model_uri}
    run |= {"readout": readout, "train_seconds": seconds, "samples": samples}
    with atomic_path(MODELS / readout, directory=True) as tmp:
        model.save(tmp / "model.keras")
        write_json(tmp / "run.json", run)
    batch_header = ["step", "batch_accuracy", "batch_loss"]
    write_csv(LOGS / readout / "batches.csv", batch_header, state["batch_rows"])
    epoch_header = ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    write_csv(LOGS / readout / "epochs.csv", epoch_header, state["epoch_rows"])
    print(
        f"train {readout}: {seconds:.1f} s, {samples / seconds:,.0f} samples/s, run {run['run_id']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readout", required=True, choices=list(P.CELL_READOUTS["lstm"]))
    train(parser.parse_args().readout)


if __name__ == "__main__":
    run_stage(main)
