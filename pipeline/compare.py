"""Stage 5, compare: every readout's eval/, models/ and logs/ -> reports/compare/.

Answers the blog post's question, does reading the classifier from output[:, -1] differ from
reading it from state_h? compare.md tabulates test accuracy, test loss and training seconds per
readout; batch_accuracy.png overlays their batch-accuracy curves; readout_gap.json holds
max |output[:, -1] - state_h| of a trained recurrent layer over the test set (exactly 0).
The same goes to MLflow, into a parent run that the readout runs are nested in, so that `mlflow ui`
shows the comparison first (docs/mlflow.md): compare.md as its description and its files,
the table compare.json, compare/readout_gap, compare/curves_identical (1 = every batch-accuracy
curve equals the first readout's), test_accuracy/<readout>, and the overlay as an image chart.
One seed per readout, so no confidence interval: intervals over seed replicates are the cross-run
report's (python -m pipeline.report). Not here, because a DVC stage's outputs must follow from its
DVC deps alone, never from what else happens to be in the MLflow store.
Params: readouts.
"""

from __future__ import annotations

import os
import time

import mlflow
import numpy as np
from mlflow.entities import Metric, Run, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import params as P
from pipeline import store, tracking
from pipeline.io import atomic_path, load_npz, read_json, write_json
from pipeline.model import load_model, readout_gap
from pipeline.plots import moving_mean, plt, save
from pipeline.stage import COMPARE, EVAL, LOGS, MODELS, PREPARED, DataError, run_stage


def read_curve(readout: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, batch accuracies) as train logged them."""
    path = LOGS / readout / "batches.csv"
    if not path.exists():
        raise DataError(f"{path}: not found; run the train stage first (dvc repro)")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, 0].astype(int), table[:, 1]


def stale_readouts(readouts: list[str]) -> list[str]:
    """Readouts with results in eval/ or logs/ that `readouts` no longer names (left from before)."""
    folders = [p for root in (EVAL, LOGS, MODELS) if root.is_dir() for p in root.iterdir()]
    return sorted({p.name for p in folders if p.is_dir()} - set(readouts))


def readout_run(client: MlflowClient, readout: str, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise DataError(
            f"{MODELS / readout / 'run.json'} names MLflow run {run_id}, which is not in "
            f"{store.redact(store.tracking_uri())}: retrain it (dvc repro -f -s train@{readout}) "
            "or point MLFLOW_TRACKING_URI at the store it was trained into"
        ) from None


IMAGE_KEY = "compare/batch_accuracy"  # the overlay, as an image chart in mlflow ui


def log_comparison(
    runs: dict[str, Run], rows: dict[str, list], values: dict[str, float], report: str, name: str
) -> str:
    """Log the comparison (files already in reports/compare/) into its parent run; its id.

    Logged again (a rerun of compare), the parent gets no second copy of anything.
    """
    parent = tracking.comparison_parent(list(runs.values()), name)
    client = MlflowClient()
    try:
        first, *others = runs.values()
        shared = {  # provenance the readout runs share: data, code, DVC experiment
            k: v
            for k, v in first.data.tags.items()
            if not k.startswith("mlflow.") and k != "readout"
            if all(o.data.tags.get(k) == v for o in others)
        }
        shared |= {"curves_identical": "true" if values["compare/curves_identical"] else "false"}
        if exp := os.environ.get("DVC_EXP_NAME"):
            shared["dvc.exp_name"] = exp
        shared["mlflow.note.content"] = report  # the run's description in mlflow ui
        logged = client.get_run(parent).data.metrics
        now = int(time.time() * 1000)
        changed = [Metric(k, v, now, 0) for k, v in values.items() if logged.get(k) != v]
        tags = [RunTag(k, v) for k, v in shared.items()]
        client.log_batch(parent, metrics=changed, tags=tags)
        client.log_artifacts(parent, str(COMPARE))
        tracking.log_table(parent, rows, "compare.json")
        charts = client.list_artifacts(parent, "images")
        if not any(a.path.startswith(f"images/{IMAGE_KEY.replace('/', '~')}+") for a in charts):
            with Image.open(COMPARE / "batch_accuracy.png") as image:
                client.log_image(parent, image.convert("RGB"), key=IMAGE_KEY, step=0)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    client.set_terminated(parent, "FINISHED")
    return parent


def main() -> None:
    params = P.load()
    readouts = params.readouts
    metrics = {r: read_json(EVAL / r / "metrics.json") for r in readouts}
    runs = {r: read_json(MODELS / r / "run.json") for r in readouts}
    curves = {r: read_curve(r) for r in readouts}
    store.configure()
    client = MlflowClient()
    mlflow_runs = {r: readout_run(client, r, runs[r]["run_id"]) for r in readouts}

    # The post's note, measured: output[:, -1] and state_h of one trained layer on the test set.
    x_test = load_npz(PREPARED / "sequences.npz", ("x_test",))["x_test"]
    gap = readout_gap(load_model(MODELS / readouts[0] / "model.keras"), x_test)

    base_steps, base_acc = curves[readouts[0]]
    same_curve = {
        r: bool(np.array_equal(steps, base_steps) and np.array_equal(acc, base_acc))
        for r, (steps, acc) in curves.items()
    }

    lines = [
        f"# Readout comparison: {params.model.cell}, {params.sequence.order}, seed {params.seed}"
        + (f", train.seed {params.train.seed}" if params.train.seed is not None else ""),
        "",
        "One training seed per readout, so no confidence interval. For intervals over seeds: "
        "`dvc exp run --queue -S train.seed=1,2,3,4,5 && dvc queue start`, then "
        "`python -m pipeline.report` (docs/experiments.md).",
        "",
        "| readout | test accuracy | test loss | training seconds | MLflow run | "
        f"batch curve identical to {readouts[0]} |",
        "|---|---|---|---|---|---|",
    ]
    for r in readouts:
        m, run = metrics[r], runs[r]
        lines.append(
            f"| {r} | {m['test_accuracy']:.4f} | {m['test_loss']:.4f} | "
            f"{run['train_seconds']:.1f} | `{run['run_id']}` | {'yes' if same_curve[r] else 'no'} |"
        )
    lines += [
        "",
        f"max |output[:, -1] - state_h| of the trained `{readouts[0]}` model's recurrent layer "
        f"over {len(x_test):,} test sequences: **{gap}**",
        "",
    ]
    if stale := stale_readouts(readouts):
        lines += [
            f"Not current: {', '.join(stale)} (in eval/, logs/ or models/ from an earlier "
            "`readouts`; this run did not make them, and `dvc metrics show` may still list "
            "them: delete those folders to drop them).",
            "",
        ]

    with atomic_path(COMPARE, directory=True) as tmp:
        (tmp / "compare.md").write_text("\n".join(lines))
        write_json(
            tmp / "readout_gap.json",
            {
                "max_abs_output_last_minus_state_h": gap,
                "model": readouts[0],
                "test_sequences": len(x_test),
            },
        )
        fig, ax = plt.subplots(figsize=(8, 4.5))
        window = max(1, len(base_acc) // 100)  # a moving mean, so that the curves stay readable
        for i, (r, (steps, acc)) in enumerate(curves.items()):
            style = ("-", "--", ":", "-.")[i % 4]  # identical curves stay visible on each other
            ax.plot(*moving_mean(steps, acc, window), style, label=r, alpha=0.8)
        ax.set(
            xlabel="batch (global step)",
            ylabel=f"batch accuracy, mean of {window} batches",
            title="Batch accuracy by readout",
        )
        ax.legend()
        save(fig, tmp / "batch_accuracy.png")
    print("\n".join(lines))

    rows = {
        "readout": readouts,
        "test_accuracy": [metrics[r]["test_accuracy"] for r in readouts],
        "test_loss": [metrics[r]["test_loss"] for r in readouts],
        "train_seconds": [runs[r]["train_seconds"] for r in readouts],
        f"curve_identical_to_{readouts[0]}": [same_curve[r] for r in readouts],
        "run_id": [runs[r]["run_id"] for r in readouts],
    }
    values = {
        "compare/readout_gap": gap,
        "compare/curves_identical": float(all(same_curve.values())),
    }
    values |= {f"test_accuracy/{r}": metrics[r]["test_accuracy"] for r in readouts}
    exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    name = f"{exp}: {params.model.cell}-{params.sequence.order} readouts"
    parent = log_comparison(mlflow_runs, rows, values, "\n".join(lines), name)
    print(f"compare: logged to MLflow run {parent} ({name}), the readout runs nested in it")


if __name__ == "__main__":
    run_stage(main)
