"""Each stage as a user runs it: bad params, bad data or an unusable tracking store give one clear
`error:` line, exit code 2, and leave nothing half-written. In process (call_stage): the same exit
codes and lines as `python -m pipeline.<stage>`, in a fraction of the time."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import call_stage, free_port, write_params, write_prepared

BAD_PARAMS = [
    ("data: {sourse: bundled}\n", "data.sourse: unknown key"),
    ("train: {epochs: -1}\n", "train.epochs: Input should be greater than or equal to 1"),
    ("train: {batch_size: 0}\n", "train.batch_size"),
    ("train: {lr: fast}\n", "train.lr: Input should be a valid number"),
    ("model: {cell: lstm2}\n", "model.cell: 'lstm2' is not allowed"),
    ("sequence: {order: spiral}\n", "sequence.order: 'spiral' is not allowed"),
    ("readouts: [output_first]\n", "readouts.0: 'output_first' is not allowed"),
    (
        "model: {cell: gru}\nreadouts: [state_c]\n",
        "'state_c' is not available for model.cell 'gru'",
    ),
    ("readouts: []\n", "readouts: List should have at least 1 item"),
    ("train: {epoch: 3}\n", "train.epoch: unknown key (did you mean train.epochs?)"),
    ("train: {epoch: 3}\n", "train.epochs: missing"),
    ("data: {val_size: 2}\n", "data.val_size: Input should be less than 1"),
    ("train: [lr\n", "not valid YAML"),
    (None, "params.yaml: file not found"),
]


def assert_refused(out: subprocess.CompletedProcess[str], message: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("content", "message"), BAD_PARAMS)
def test_bad_params_stop_fetch_before_any_work(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "params.yaml").write_text(content)
    assert_refused(call_stage("fetch", tmp_path), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["params.yaml"] if content else [])


def test_a_readout_the_cell_lacks_stops_train_before_any_work(tmp_path: Path) -> None:
    write_params(tmp_path, {"model": {"cell": "gru"}, "readouts": ["state_h"]})
    out = call_stage("train", tmp_path, "--readout", "state_c")
    assert_refused(out, "readout: 'state_c' is not available for model.cell 'gru'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def write_raw(repo: Path, **arrays: np.ndarray) -> None:
    (repo / "data/raw").mkdir(parents=True)
    np.savez(repo / "data/raw/dataset.npz", **arrays)
    (repo / "data/raw/source.json").write_text('{"source": "path", "dataset": "mnist"}')


def good_raw() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(40, dtype=np.uint8) % 10
    return {
        "x_train": rng.integers(0, 256, (40, 28, 28), np.uint8),
        "y_train": y,
        "x_test": rng.integers(0, 256, (10, 28, 28), np.uint8),
        "y_test": y[:10],
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "not a readable .npz"),
        ("pickle", "cannot be read without pickle"),
        ("labels", "labels must be integers 0-9"),
    ],
)
def test_bad_data_is_refused_by_fetch_and_preprocess_with_nothing_written(
    tmp_path: Path, damage: str, message: str
) -> None:
    arrays = good_raw()
    if damage == "pickle":
        arrays["y_train"] = np.array([object()] * 40, dtype=object)
    if damage == "labels":
        arrays["y_train"] = arrays["y_train"] + 5
    source = tmp_path / "given.npz"
    np.savez(source, **arrays)
    if damage == "truncate":
        source.write_bytes(source.read_bytes()[:5000])
    write_params(tmp_path, {"data": {"source": "path", "path": str(source)}})
    assert_refused(call_stage("fetch", tmp_path), message)
    assert not (tmp_path / "data").exists()

    # The same file placed where preprocess reads it (as if written by hand): refused as well.
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/dataset.npz").write_bytes(source.read_bytes())
    (tmp_path / "data/raw/source.json").write_text("{}")
    out = call_stage("preprocess", tmp_path)
    if damage == "labels":  # preprocess trusts fetch's validation of values, not of format
        return
    assert_refused(out, "dataset.npz")
    assert not (tmp_path / "data/prepared").exists()


def test_unreachable_tracking_server_fails_train_in_seconds(tmp_path: Path) -> None:
    write_params(tmp_path)
    write_prepared(tmp_path)
    port = free_port()
    start = time.monotonic()
    out = call_stage(
        "train",
        tmp_path,
        "--readout",
        "state_h",
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
    )
    assert_refused(out, f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: no MLflow server answered")
    assert time.monotonic() - start < 120  # seconds, not the minutes of a training run
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_outputs_cannot_be_steered_outside_the_repo(tmp_path: Path) -> None:
    """Output paths are fixed in each stage; the one name taken from outside is a known readout."""
    write_params(tmp_path)
    out = call_stage("train", tmp_path, "--readout", "../../escape")
    assert out.returncode == 2 and "invalid choice: '../../escape'" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
