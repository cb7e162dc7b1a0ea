"""Stage 4, evaluate (once per readout): models/<readout>/ + test set -> eval/<readout>/.

Writes metrics.json (test loss and accuracy, read by `dvc metrics show/diff` and `dvc exp show`),
predictions.npz (the class predicted for each test image, in test-set order: what register pairs
with the champion's, and logs into the run so that a later register finds the champion's),
per_class.csv (accuracy per class) and confusion.csv (one row per test image), both for
`dvc plots show`, and confusion.png; logs the same into the MLflow run that train opened (the
accuracy per class as the table per_class.json, not ten metrics that crowd the charts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import numpy as np

from pipeline import params as P
from pipeline import store, tracking
from pipeline.io import load_npz, read_json, save_npz, write_csv, write_json
from pipeline.model import load_model, score
from pipeline.plots import plt, save
from pipeline.stage import EVAL, MODELS, PREDICTIONS, PREPARED, need_space, run_stage

PER_CLASS = "per_class.json"  # the MLflow table artifact


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """10x10 counts: row = true class, column = predicted class."""
    return np.bincount(actual * 10 + predicted, minlength=100).reshape(10, 10)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """The share of each true class predicted right; 0 for a class absent from the test set."""
    return matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)


def plot_confusion(matrix: np.ndarray, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="actual", title=title)
    save(fig, path)


def evaluate(readout: str) -> None:
    P.load()  # validate params.yaml before any work
    data = load_npz(PREPARED / "sequences.npz", ("x_test", "y_test"))
    run = read_json(MODELS / readout / "run.json")
    # eval/ and mlruns/ each get the plot and tables (~30 bytes a test image), plus MLflow's rows
    need_space("evaluate", 2**20 + 64 * len(data["y_test"]))
    tracking.end_abandoned(store.configure())
    model = load_model(MODELS / readout / "model.keras")

    y = data["y_test"]
    loss, accuracy, predicted = score(model, data["x_test"], y)
    matrix = confusion_matrix(y, predicted)
    per_class = per_class_accuracy(matrix)
    out = EVAL / readout
    write_json(out / "metrics.json", {"test_accuracy": accuracy, "test_loss": loss})
    save_npz(out / PREDICTIONS, **{"class": predicted.astype(np.uint8)})  # classes 0-9
    write_csv(out / "per_class.csv", ["class", "accuracy"], enumerate(per_class.tolist()))
    write_csv(
        out / "confusion.csv", ["actual", "predicted"], np.column_stack([y, predicted]).tolist()
    )
    title = f"{readout}: test accuracy {accuracy:.4f} ({len(y):,} images)"
    plot_confusion(matrix, title, out / "confusion.png")

    # Into the run that train opened: one MLflow run per trained model.
    with mlflow.start_run(run_id=run["run_id"], tags=tracking.owner()):
        mlflow.log_metrics({"test_accuracy": accuracy, "test_loss": loss})
        table = {"class": list(range(10)), "accuracy": per_class.tolist()}
        tracking.log_table(
            run["run_id"], table | {"images": matrix.sum(axis=1).tolist()}, PER_CLASS
        )
        mlflow.log_artifact(str(out / "confusion.png"))
        mlflow.log_artifact(str(out / PREDICTIONS))
        mlflow.log_dict({"actual_by_predicted": matrix.tolist()}, "confusion_matrix.json")
    print(f"evaluate {readout}: test accuracy {accuracy:.4f}, loss {loss:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readout", required=True, choices=list(P.CELL_READOUTS["lstm"]))
    evaluate(parser.parse_args(argv).readout)


if __name__ == "__main__":
    run_stage(main)
