"""A trained project copied with `cp -r`, or moved, keeps working: its stages read its own
artifacts and write into its own mlruns/, never the original's (MLflow stores absolute paths)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
from helpers import call_stage, log_small_image_model, one_error, working_in, write_params
from mlflow.tracking import MlflowClient

from pipeline import store


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_copied_then_moved_project_uses_its_own_artifacts(tmp_path: Path) -> None:
    original = tmp_path / "original"
    (original / ".dvc").mkdir(parents=True)
    write_params(original)
    digits = np.random.default_rng(0).integers(0, 256, (2, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "two.npy", digits)
    with working_in(original) as root:
        uri = log_small_image_model(root, np.zeros((1, 28, 28), np.float32))
        mlflow.register_model(uri, "rnn-mnist")
        MlflowClient().set_registered_model_alias("rnn-mnist", "champion", "1")
        run_id = MlflowClient().get_logged_model(uri.removeprefix("models:/")).source_run_id
        MlflowClient().log_text(run_id, "original", "notes.txt")
    answer = call_stage("predict", original, str(tmp_path / "two.npy"))
    assert answer.returncode == 0, answer.stderr
    before = files(original / "mlruns")

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    with working_in(copy):
        experiment = store.configure()  # as every stage does first
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_text("copy", "notes.txt")
    assert files(original / "mlruns") == before  # nothing written into the original's folder
    assert (copy / "mlruns" / run.info.run_id / "artifacts/notes.txt").is_file()
    out = call_stage("predict", copy, str(tmp_path / "two.npy"))
    assert out.returncode == 0 and out.stdout == answer.stdout, out.stderr
    assert out.stderr == ""  # the paths moved once, on configure()

    moved = tmp_path / "moved"
    copy.rename(moved)
    shutil.rmtree(original)  # nothing to fall back on
    out = call_stage("predict", moved, str(tmp_path / "two.npy"))
    assert out.returncode == 0 and out.stdout == answer.stdout, out.stderr
    assert f"artifact paths moved from {copy / 'mlruns'} to {moved / 'mlruns'}" in out.stderr
    with working_in(moved):
        client = MlflowClient(store.tracking_uri())
        assert client.download_artifacts(run_id, "notes.txt", str(tmp_path)).endswith("notes.txt")
        assert (tmp_path / "notes.txt").read_text() == "original"
        location = client.get_model_version_download_uri("rnn-mnist", "1")
        assert location.startswith(str(moved / "mlruns")), location


def test_a_store_copied_without_its_artifacts_is_refused_in_one_line(tmp_path: Path) -> None:
    original = tmp_path / "original"
    (original / ".dvc").mkdir(parents=True)
    with working_in(original):
        store.configure()
        with mlflow.start_run():
            mlflow.log_text("original", "notes.txt")
    clone = tmp_path / "clone"
    (clone / ".dvc").mkdir(parents=True)
    shutil.copy2(original / "mlflow.db", clone / "mlflow.db")
    stored = (clone / "mlflow.db").read_bytes()
    out = call_stage("report", clone)
    line = one_error(out)
    assert f"keeps its artifacts in {original / 'mlruns'}" in line, line
    assert f"cp -r {original / 'mlruns'} {clone}/" in line
    assert (clone / "mlflow.db").read_bytes() == stored and not (clone / "mlruns").exists()
