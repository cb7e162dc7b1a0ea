"""Stage 3, train (once per readout): data/prepared/ -> models/<readout>/ and logs/<readout>/.

Writes model.keras and run.json (the MLflow run id that evaluate logs into) under models/<readout>/,
and the per-batch and per-epoch curves as CSV under logs/<readout>/ for `dvc plots show`.
MLflow gets every param, the tags, `batch_accuracy`/`batch_loss` (the accuracy and loss of that
one batch, not Keras's running mean), per-epoch accuracy/loss/val_accuracy/val_loss, and the model.
Params: seed, model.*, train.lr, train.batch_size, train.epochs, train.log_every_n_batches.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import Model, infer_signature

from pipeline import params as P
from pipeline import tracking
from pipeline.io import atomic_path, load_npz, read_json, run_stage, write_csv, write_json
from pipeline.model import build_model, score

PREPARED = Path("data/prepared")
MODELS = Path("models")
LOGS = Path("logs")
CHECKPOINTS = Path("checkpoints")  # not a DVC out: it must survive a killed run (resume, later)


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


def fit(
    model: keras.Model, data: dict[str, np.ndarray], params: P.Params, log: tracking.MetricBuffer
):
    """Train for params.train.epochs; return the logged batch rows and per-epoch rows."""
    cfg, seed = params.train, params.seed
    x_train, y_train = data["x_train"], data["y_train"]
    _, steps, features = x_train.shape
    optimizer = keras.optimizers.Adam(learning_rate=cfg.lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    spec = (tf.TensorSpec([None, steps, features], tf.float32), tf.TensorSpec([None], tf.int32))

    @tf.function(input_signature=spec)
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        # The accuracy of this batch alone, from the forward pass that made the gradient.
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    batch_rows, epoch_rows, step = [], [], 0
    for epoch in range(cfg.epochs):
        sums = np.zeros(3)  # samples, loss * samples, hits
        for idx in epoch_batches(len(y_train), cfg.batch_size, seed, epoch):
            loss, acc = (float(t) for t in train_step(x_train[idx], y_train[idx]))
            sums += (len(idx), loss * len(idx), acc * len(idx))
            if step % cfg.log_every_n_batches == 0:
                log.add("batch_accuracy", acc, step)
                log.add("batch_loss", loss, step)
                batch_rows.append([step, acc, loss])
            step += 1
        val_loss, val_acc, _ = score(model, data["x_val"], data["y_val"])
        row = {"accuracy": sums[2] / sums[0], "loss": sums[1] / sums[0]}
        row |= {"val_accuracy": val_acc, "val_loss": val_loss}
        for key, value in row.items():
            log.add(key, value, epoch)
        log.flush()
        epoch_rows.append([epoch, *row.values()])
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
        )
    return batch_rows, epoch_rows


def train(readout: str) -> None:
    params = P.load()
    params.check_readout(readout)
    data = load_npz(PREPARED / "sequences.npz", ("x_train", "y_train", "x_val", "y_val"))
    meta = read_json(PREPARED / "meta.json")
    n, steps, features = data["x_train"].shape
    experiment_id = tracking.configure()  # fails here, before training, if the store is unusable

    keras.config.disable_interactive_logging()  # no progress bars from predict() calls
    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    m = params.model
    model = build_model(steps, features, m.cell, readout, m.input_units, m.units)

    run_name = f"{m.cell}-{meta['order']}-{readout}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        run_id = run.info.run_id
        # Kept on disk from the start, beside the (future) checkpoint, not only in memory.
        write_json(CHECKPOINTS / readout / "run.json", {"run_id": run_id})
        mlflow.log_params({k: str(v) for k, v in params.flat().items()})
        mlflow.set_tags(tracking.run_tags(readout, meta))
        log = tracking.MetricBuffer(run_id)
        start = time.perf_counter()
        batch_rows, epoch_rows = fit(model, data, params, log)
        seconds = time.perf_counter() - start
        samples = n * params.train.epochs
        mlflow.log_metrics(
            {
                "train_seconds": seconds,
                "samples_per_second": samples / seconds,
                "logging_seconds": log.seconds,  # time spent sending metrics, inside train_seconds
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

    with atomic_path(MODELS / readout, directory=True) as tmp:
        model.save(tmp / "model.keras")
        write_json(
            tmp / "run.json",
            {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "model_uri": info.model_uri,
                "readout": readout,
                "train_seconds": seconds,
                "samples": samples,
            },
        )
    write_csv(LOGS / readout / "batches.csv", ["step", "batch_accuracy", "batch_loss"], batch_rows)
    write_csv(
        LOGS / readout / "epochs.csv",
        ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"],
        epoch_rows,
    )
    print(f"train {readout}: {seconds:.1f} s, {samples / seconds:,.0f} samples/s, run {run_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readout", required=True, choices=list(P.CELL_READOUTS["lstm"]))
    train(parser.parse_args().readout)


if __name__ == "__main__":
    run_stage(main)
