"""A training run killed at random moments resumes into the same MLflow run, losing nothing.

Real processes and real signals: `dvc repro` is started, SIGKILLed (with its children) at random
points while train runs, and restarted; the result must equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAINED, call_stage, clean_env, copy_project, dvc, start_repro, wait_for
from mlflow.tracking import MlflowClient

from pipeline import store

pytestmark = pytest.mark.slow
PARAMS = {"data": {"source": "bundled"}, "train": {"epochs": 6}, "readouts": ["state_h"]}
CHECKPOINT = Path("checkpoints/state_h/checkpoint.npz")


def curve(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def runs(repo: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(store.EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id], TRAINED)


def start_training(tmp_path: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """A project copy with prepared data and `pipeline.train` running, its first checkpoint written."""
    repo = copy_project(tmp_path / "repo", PARAMS)
    assert call_stage("fetch", repo).returncode == call_stage("preprocess", repo).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--readout", "state_h"], cwd=repo, env=clean_env()
    )
    assert wait_for(repo / CHECKPOINT, process)
    return repo, process


# All the comparison reads: not compare, register (each a process importing TensorFlow).
UP_TO = ("evaluate@state_h",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("reference"), PARAMS)
    dvc("repro", *UP_TO, cwd=repo)
    return repo


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
    reference: Path, tmp_path: Path
) -> None:
    repo = copy_project(tmp_path / "repo", PARAMS)
    rng = random.Random(2026)
    kills = 0
    for _ in range(3):
        process = start_repro(repo, targets=UP_TO)
        if wait_for(repo / CHECKPOINT, process):
            time.sleep(rng.uniform(0.0, 6.0))  # somewhere inside the ~8 s of training
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                kills += 1
        process.wait(timeout=300)
        if process.returncode == 0:
            break
    print(f"\nkill trials: {kills} SIGKILLs during training, then one clean `dvc repro`")
    assert kills >= 2, "the trials should really have killed training"
    dvc("repro", *UP_TO, cwd=repo)

    for name in (
        "eval/state_h/metrics.json",
        "logs/state_h/batches.csv",
        "logs/state_h/epochs.csv",
    ):
        assert (repo / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (repo / CHECKPOINT).exists()  # removed once the run finished

    client, found = runs(repo)
    ref_client, ref_runs = runs(reference)
    assert len(found) == 1, "every restart resumed the same MLflow run"
    run, ref_run = found[0], ref_runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == json.loads((repo / "models/state_h/run.json").read_text())["run_id"]
    for key in ("batch_accuracy", "batch_loss", "accuracy", "val_loss"):
        points = curve(client, run.info.run_id, key)
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{key}: a step was logged twice"
        assert points == curve(ref_client, ref_run.info.run_id, key), key
    assert len(curve(client, run.info.run_id, "batch_accuracy")) == 6 * 29
    assert run.data.metrics["test_accuracy"] == ref_run.data.metrics["test_accuracy"]


def test_sigterm_saves_a_checkpoint_marks_the_run_killed_and_changed_params_start_clean(
    tmp_path: Path,
) -> None:
    """One trainer, two cases: resuming the same run after a kill is the test above's."""
    repo, process = start_training(tmp_path)
    mtime = (repo / CHECKPOINT).stat().st_mtime_ns
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert (repo / CHECKPOINT).stat().st_mtime_ns > mtime  # saved on the way out
    _, found = runs(repo)
    assert [r.info.status for r in found] == ["KILLED"]

    # Other params: the checkpoint is not resumed; a new run (1 epoch: less to wait for).
    text = (repo / "params.yaml").read_text()
    text = text.replace("lr: 0.001", "lr: 0.002").replace("epochs: 6", "epochs: 1")
    (repo / "params.yaml").write_text(text)
    out = call_stage("train", repo, "--readout", "state_h")  # the stage's logic: in process
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting clean" in out.stdout
    _, found = runs(repo)
    status = {r.data.params["train.lr"]: r.info.status for r in found}
    assert status == {"0.001": "KILLED", "0.002": "FINISHED"}
