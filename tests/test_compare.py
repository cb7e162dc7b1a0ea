"""compare: reading train's curves, and naming results left over from earlier readouts."""

from pathlib import Path

import numpy as np
import pytest

from pipeline import compare
from pipeline.io import write_csv
from pipeline.stage import DataError


def test_read_curve_returns_steps_and_batch_accuracies(isolated: Path) -> None:
    rows = [[0, 0.125, 2.3], [5, 0.5, 1.1], [10, 0.875, 0.4]]
    write_csv(isolated / "logs/state_h/batches.csv", ["step", "batch_accuracy", "batch_loss"], rows)
    steps, accuracy = compare.read_curve("state_h")
    np.testing.assert_array_equal(steps, [0, 5, 10])
    np.testing.assert_array_equal(accuracy, [0.125, 0.5, 0.875])
    assert steps.dtype.kind == "i"


def test_read_curve_of_a_single_batch(isolated: Path) -> None:
    write_csv(
        isolated / "logs/state_c/batches.csv", ["step", "batch_accuracy", "batch_loss"], [[0, 1, 0]]
    )
    steps, accuracy = compare.read_curve("state_c")
    assert steps.tolist() == [0] and accuracy.tolist() == [1.0]


def test_a_missing_curve_says_which_stage_to_run(isolated: Path) -> None:
    with pytest.raises(DataError, match=r"logs/output_last/batches\.csv: not found; run the train"):
        compare.read_curve("output_last")


def test_results_of_readouts_no_longer_listed_are_named(isolated: Path) -> None:
    for folder in ("eval/state_h", "eval/output_last", "logs/output_last", "models/state_c"):
        (isolated / folder).mkdir(parents=True)
    (isolated / "models/.gitignore").write_text("/state_c\n")  # DVC's, not a readout
    assert compare.stale_readouts(["state_h"]) == ["output_last", "state_c"]
    assert compare.stale_readouts(["state_h", "output_last", "state_c"]) == []
