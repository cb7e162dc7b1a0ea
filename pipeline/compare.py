"""Stage 5, compare: every readout's eval/, models/ and logs/ -> reports/compare/.

Answers the blog post's question, does reading the classifier from output[:, -1] differ from
reading it from state_h? compare.md tabulates test accuracy, test loss and training seconds per
readout; batch_accuracy.png overlays their batch-accuracy curves; readout_gap.json holds
max |output[:, -1] - state_h| of a trained recurrent layer over the test set (exactly 0).
Params: readouts.
"""

from __future__ import annotations

import numpy as np

from pipeline import params as P
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


def main() -> None:
    params = P.load()
    readouts = params.readouts
    metrics = {r: read_json(EVAL / r / "metrics.json") for r in readouts}
    runs = {r: read_json(MODELS / r / "run.json") for r in readouts}
    curves = {r: read_curve(r) for r in readouts}

    # The post's note, measured: output[:, -1] and state_h of one trained layer on the test set.
    x_test = load_npz(PREPARED / "sequences.npz", ("x_test",))["x_test"]
    gap = readout_gap(load_model(MODELS / readouts[0] / "model.keras"), x_test)

    base_steps, base_acc = curves[readouts[0]]
    same_curve = {
        r: bool(np.array_equal(steps, base_steps) and np.array_equal(acc, base_acc))
        for r, (steps, acc) in curves.items()
    }

    lines = [
        f"# Readout comparison: {params.model.cell}, {params.sequence.order}, seed {params.seed}",
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


if __name__ == "__main__":
    run_stage(main)
