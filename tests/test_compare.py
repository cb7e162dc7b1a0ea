"""compare: reading train's curves, naming results left over from earlier readouts, and logging
the comparison into a parent run of the readout runs."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import compare, store
from pipeline.io import write_csv
from pipeline.plots import plt, save
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


def readout_runs(experiment_id: str) -> dict:
    """Two finished readout runs as train and evaluate leave them, with the tags they share."""
    client = MlflowClient()
    runs = {}
    for readout in ("state_h", "output_last"):
        tags = {"readout": readout, "data.source": "bundled", "model.cell": "lstm"}
        run_id = client.create_run(experiment_id, tags=tags, run_name=readout).info.run_id
        client.set_terminated(run_id)
        runs[readout] = client.get_run(run_id)
    return runs


def test_the_comparison_goes_into_a_parent_run_once_however_often_compare_runs(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "fussy-dirk")
    experiment_id = store.configure()
    runs = readout_runs(experiment_id)
    (isolated / "reports/compare").mkdir(parents=True)
    (isolated / "reports/compare/compare.md").write_text("# Readout comparison\n")
    (isolated / "reports/compare/readout_gap.json").write_text('{"gap": 0.0}')
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.1, 0.9])
    save(fig, isolated / "reports/compare/batch_accuracy.png")
    rows = {"readout": ["state_h", "output_last"], "test_accuracy": [0.96, 0.96]}
    values = {"compare/readout_gap": 0.0, "compare/curves_identical": 1.0}
    values |= {"test_accuracy/state_h": 0.96, "test_accuracy/output_last": 0.96}

    name = "fussy-dirk: lstm-rows readouts"
    parent = compare.log_comparison(runs, rows, values, "# Readout comparison\n", name)
    assert compare.log_comparison(runs, rows, values, "# Readout comparison\n", name) == parent

    client = MlflowClient()
    run = client.get_run(parent)
    assert run.info.run_name == name and run.info.status == "FINISHED"
    assert run.data.metrics == values
    for key in values:  # a rerun adds no second point
        assert len(client.get_metric_history(parent, key)) == 1
    tags = run.data.tags
    assert tags["dvc.exp_name"] == "fussy-dirk" and tags["curves_identical"] == "true"
    assert tags["data.source"] == "bundled" and tags["model.cell"] == "lstm"
    assert "readout" not in tags and tags["mlflow.note.content"] == "# Readout comparison\n"
    for readout_run in runs.values():
        assert client.get_run(readout_run.info.run_id).data.tags["mlflow.parentRunId"] == parent
    files = {a.path for a in client.list_artifacts(parent)}
    assert {"compare.md", "readout_gap.json", "batch_accuracy.png", "compare.json"} <= files
    images = [a.path for a in client.list_artifacts(parent, "images")]
    assert len(images) == 2, images  # the overlay once: full size and compressed
    assert all(p.startswith("images/compare~batch_accuracy+step+0+") for p in images)
    table = client.load_table(experiment_id, "compare.json", [parent])
    assert table.to_dict("list") == rows
    assert len(client.search_runs([experiment_id])) == 3  # one parent, two readout runs


def test_a_run_missing_from_the_store_is_one_error_naming_the_file(isolated: Path) -> None:
    store.configure()
    with pytest.raises(DataError, match=r"models/state_h/run\.json names MLflow run 0+, which is"):
        compare.readout_run(MlflowClient(), "state_h", "0" * 32)
