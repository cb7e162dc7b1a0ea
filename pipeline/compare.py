"""Stage 5, compare: every readout's eval/, models/ and logs/ -> reports/.

Answers the seed's question, does reading the classifier from output[:, -1] differ from reading it
from state_h? reports/compare.md tabulates test accuracy, test loss and training seconds per
readout; reports/batch_accuracy.png overlays their batch-accuracy curves; reports/readout_gap.json
holds max |output[:, -1] - state_h| of a trained recurrent layer over the test set (exactly 0).
Params: train.readouts.
"""

from __future__ import annotations

from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from pipeline import params as P
from pipeline.io import DataError, atomic_path, load_npz, read_json, run_stage, write_json
from pipeline.model import readout_gap

PREPARED = Path("data/prepared")
OUT = Path("reports")


def read_curve(readout: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, batch accuracies) as train logged them."""
    path = Path("logs") / readout / "batches.csv"
    if not path.exists():
        raise DataError(f"{path}: not found; run the train stage first (dvc repro)")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, 0].astype(int), table[:, 1]


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window < 2:
        return y
    return np.convolve(y, np.ones(window) / window, mode="valid")


def main() -> None:
    params = P.load()
    readouts = params.train.readouts
    metrics = {r: read_json(Path("eval") / r / "metrics.json") for r in readouts}
    runs = {r: read_json(Path("models") / r / "run.json") for r in readouts}
    curves = {r: read_curve(r) for r in readouts}

    # The seed's note, measured: output[:, -1] and state_h of one trained layer on the test set.
    x_test = load_npz(PREPARED / "sequences.npz", ("x_test",))["x_test"]
    model = keras.saving.load_model(Path("models") / readouts[0] / "model.keras", safe_mode=True)
    gap = readout_gap(model, x_test)

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

    with atomic_path(OUT, directory=True) as tmp:
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
            style = ("-", "--", ":", "-.")[
                i % 4
            ]  # identical curves stay visible on top of each other
            ax.plot(steps[window - 1 :], smooth(acc, window), style, label=r, alpha=0.8)
        ax.set(
            xlabel="batch (global step)",
            ylabel=f"batch accuracy, mean of {window} batches",
            title="Batch accuracy by readout",
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(tmp / "batch_accuracy.png", dpi=100)
        plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    run_stage(main)
