"""Compare many runs from the MLflow store: python -m pipeline.report [--runs ID ... | --exp NAME ...].

Reads every FINISHED run of the experiment (or the runs named, or those of the DVC experiments
named: their `dvc.exp_name` tag, as `dvc exp show` names them) with full metric histories, not the
UI's sampled charts, and writes to reports/experiments/ (no stage writes or deletes it):
  report.md           one row per run: its DVC experiment (blank: a workspace run), whether its
                      params or code differed from its commit (dirty), the params that differ
                      between runs, test accuracy, best val accuracy, training seconds, samples/s,
                      peak RSS, a hash of all params
  curves.png          batch accuracy (smoothed) and val accuracy per epoch, one line per run
  cell_by_order.png   best test accuracy for each model.cell x sequence.order
Not a DVC stage: its input is the MLflow store, which grows with every experiment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline import store, tracking
from pipeline.io import atomic_path
from pipeline.plots import moving_mean, plt, save
from pipeline.stage import EXPERIMENTS, ConfigError, run_stage

SMOOTH = 25  # batches in the moving average of the batch-accuracy curves
TRAINED = "tags.readout IS NOT NULL"  # a trained model's run, not a comparison's parent run


def find_runs(
    client: MlflowClient, experiment: str, run_ids: list[str], exp_names: list[str]
) -> list[Run]:
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"no experiment {experiment!r} in {store.redact(store.tracking_uri())}; run dvc repro"
        )
    if exp_names:
        runs = []
        for name in exp_names:
            query = f"tags.`dvc.exp_name` = '{name}' AND {TRAINED}"
            if not (named := client.search_runs([found.experiment_id], query)):
                raise ConfigError(f"no run is tagged dvc.exp_name = {name!r} in {experiment!r}")
            runs += named
        return runs
    runs = client.search_runs(
        [found.experiment_id], f"attributes.status = 'FINISHED' AND {TRAINED}"
    )
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no finished run yet; run dvc repro")
    return runs


def history(client: MlflowClient, run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in points]), np.array([m.value for m in points])


def label(run: Run) -> str:
    """<cell>-<order>-<readout> [dvc experiment or run id]: what differs, and which one."""
    return f"{run.info.run_name} [{run.data.tags.get('dvc.exp_name') or run.info.run_id[:6]}]"


def dirty(run: Run) -> str:
    """git.dirty in the table: blank if the run came from its commit as committed, else what
    differed (params, code), or ? when not known (no git, or a run from before the tag)."""
    state = run.data.tags.get("git.dirty", "unknown")
    return {"false": "", "unknown": "?"}.get(state, state)


def table(runs: list[Run], best_val: dict[str, float]) -> str:
    keys = sorted({k for run in runs for k in run.data.params})
    differ = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    header = ["run", "readout", "dvc exp", "dirty", *differ, "test acc", "best val acc"]
    header += ["train s", "samples/s", "peak RSS MiB", "params hash"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def number(run: Run, key: str, fmt: str) -> str:
        value = run.data.metrics.get(key)
        return "-" if value is None else format(value, fmt)

    ordered = sorted(runs, key=lambda r: -r.data.metrics.get("test_accuracy", -1.0))
    for run in ordered:
        cells = [f"`{run.info.run_id[:8]}` {run.info.run_name}", run.data.tags.get("readout", "-")]
        cells += [run.data.tags.get("dvc.exp_name", ""), dirty(run)]
        cells += [run.data.params.get(k, "-") for k in differ]
        val = best_val.get(run.info.run_id)
        cells += [number(run, "test_accuracy", ".4f"), "-" if val is None else f"{val:.4f}"]
        cells += [number(run, "train_seconds", ".1f"), number(run, "samples_per_second", ",.0f")]
        cells += [number(run, "peak_rss_mib", ",.0f"), f"`{tracking.params_hash(run.data.params)}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(client: MlflowClient, runs: list[Run], path: Path) -> dict[str, float]:
    """Draw the curves; return each run's best val accuracy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    best_val = {}
    for run in runs:
        steps, acc = moving_mean(*history(client, run, "batch_accuracy"), SMOOTH)
        left.plot(steps, acc, linewidth=1, label=label(run))
        epochs, val = history(client, run, "val_accuracy")
        if len(val):
            best_val[run.info.run_id] = float(val.max())
            right.plot(epochs + 1, val, marker="o", markersize=3, label=label(run))
    left.set(xlabel="batch", ylabel=f"batch accuracy (mean of {SMOOTH})", title="training")
    right.set(xlabel="epoch", ylabel="val accuracy", title="validation")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.25
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize="x-small", loc="lower right")
    save(fig, path, dpi=110)
    return best_val


def plot_cell_by_order(runs: list[Run], path: Path) -> None:
    best: dict[tuple[str, str], float] = {}
    for run in runs:
        if (acc := run.data.metrics.get("test_accuracy")) is not None:
            key = (
                run.data.params.get("model.cell", "?"),
                run.data.params.get("sequence.order", "?"),
            )
            best[key] = max(best.get(key, 0.0), acc)
    cells = sorted({c for c, _ in best})
    orders = sorted({o for _, o in best})
    fig, ax = plt.subplots(figsize=(max(5, 2 * len(orders) + 2), 4))
    width = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        xs = [j + i * width for j, o in enumerate(orders) if (cell, o) in best]
        ys = [best[cell, o] for o in orders if (cell, o) in best]
        bars = ax.bar(xs, ys, width, label=cell)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small")
    ax.set_xticks([j + width * (len(cells) - 1) / 2 for j in range(len(orders))], orders)
    ax.set(ylim=(0, 1.05), ylabel="best test accuracy", title="model.cell x sequence.order")
    ax.legend(fontsize="small")
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], help="run ids (default: all finished)")
    parser.add_argument("--exp", nargs="*", default=[], help="DVC experiment names (dvc exp show)")
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME"))
    parser.add_argument("--out", type=Path, default=EXPERIMENTS)
    args = parser.parse_args(argv)
    uri = store.tracking_uri()
    store.existing_store(uri)  # a damaged store gets one line, a missing one is not created
    client = MlflowClient(uri)
    runs = find_runs(client, args.experiment or store.EXPERIMENT, args.runs, args.exp)
    with atomic_path(args.out, directory=True) as tmp:
        best_val = plot_curves(client, runs, tmp / "curves.png")
        plot_cell_by_order(runs, tmp / "cell_by_order.png")
        (tmp / "report.md").write_text(
            f"# {len(runs)} runs\n\n{table(runs, best_val)}\n"
            "![curves](curves.png)\n\n![cell by order](cell_by_order.png)\n"
        )
    for run in runs if args.exp or args.runs else []:
        print(
            f"{label(run)}: run {run.info.run_id}, test accuracy {run.data.metrics.get('test_accuracy')}"
        )
    print(f"report: {len(runs)} runs -> {args.out}/report.md")


if __name__ == "__main__":
    run_stage(main)
