"""A team's tracking server: `mlflow server` on PostgreSQL with artifacts served by the server,
with and without logins, and the real pipeline against it.

PostgreSQL comes from .ci/run, which starts the cluster and sets TEST_POSTGRES_URL; with CI set, a
missing database fails these tests instead of skipping them. The tests without logins share one
server (module_server), each in its own experiment and registered-model names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    ADMIN,
    REPRO,
    TRAINED,
    as_user,
    call_stage,
    call_stages,
    clean_env,
    copy_project,
    login,
    one_error,
    sh,
    wait_for,
)
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from pipeline import register, store

pytestmark = pytest.mark.slow
SMALL = {
    "data": {"source": "bundled"},
    "train": {"epochs": 1},
    "model": {"units": 16, "input_units": 16},  # what is logged where, not how well it learns
}


def test_dvc_repro_lands_runs_points_models_and_registry_on_the_server(
    module_server: str, tmp_path: Path
) -> None:
    server = module_server  # the experiment rnn-mnist-sequences and the model rnn-mnist are ours
    # One readout: what a second adds (two runs in one comparison, two versions) is the same on
    # any store, and tests/test_pipeline.py checks it; here each costs processes importing TF.
    repo = copy_project(tmp_path / "repo", SMALL | {"readouts": ["state_h"]})
    env = clean_env(MLFLOW_TRACKING_URI=server)
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=env)

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("rnn-mnist-sequences")
    runs = client.search_runs([experiment.experiment_id], TRAINED)
    assert [r.data.tags["readout"] for r in runs] == ["state_h"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "batch_accuracy")) == 29
        evaluated = json.loads(
            (repo / "eval" / run.data.tags["readout"] / "metrics.json").read_text()
        )
        assert run.data.metrics["test_accuracy"] == evaluated["test_accuracy"]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server stores them
    (version,) = client.search_model_versions("name = 'rnn-mnist'")
    assert version.run_id == runs[0].info.run_id
    assert client.get_model_version_by_alias("rnn-mnist", "champion").version == "1"
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()

    report = call_stage("report", repo, env={"MLFLOW_TRACKING_URI": server})
    assert report.returncode == 0, report.stderr
    table = (repo / "reports/experiments/report.md").read_text()
    assert table.startswith("# 1 runs")


def test_a_killed_training_resumes_into_the_same_run_on_the_server(
    module_server: str, tmp_path: Path
) -> None:
    """The training process SIGKILLed after its first epoch; the stage run again resumes it into
    the same run on the server, every batch's point there once. (tests/test_resume.py kills
    `dvc repro` itself, on the embedded store.)"""
    epochs = 4
    repo = copy_project(tmp_path / "repo", SMALL | {"train": {"epochs": epochs}})
    env = {"MLFLOW_TRACKING_URI": module_server, "MLFLOW_EXPERIMENT_NAME": "killed-and-resumed"}
    call_stages(repo, REPRO[:2], {})  # fetch, preprocess
    checkpoint = repo / "checkpoints/state_h/checkpoint.npz"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--readout", "state_h"],
        cwd=repo,
        env=clean_env(**env),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for(checkpoint, process)  # saved as the run starts

    def saved() -> tuple[int, int]:  # a save writes a new file and renames it over the old
        return checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns

    first = saved()
    while process.poll() is None and saved() == first:
        time.sleep(0.02)  # until the first epoch's checkpoint: a kill then is inside training
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert checkpoint.exists(), "training had finished before the kill"  # removed at its end
    out = call_stage("train", repo, "--readout", "state_h", env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(module_server)
    experiment = client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
    (run,) = client.search_runs([experiment.experiment_id], TRAINED)  # resumed, not a second
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "batch_accuracy"))
    assert steps == list(range(epochs * 29))  # every batch once
    assert run.info.run_id == json.loads((repo / "models/state_h/run.json").read_text())["run_id"]


def test_a_server_with_logins_refuses_a_stage_without_one_in_seconds_and_works_with_it(
    auth_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each stage is refused, and when: in process, as `dvc repro` would run it."""
    uri, _ = auth_server
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    repo = copy_project(tmp_path / "repo", SMALL | {"readouts": ["state_h"]})
    call_stages(repo, REPRO[:2], {})  # fetch, preprocess
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)  # no login but the one each call gives
    for credentials, message in [
        ({}, "the server asks for a login: set MLFLOW_TRACKING_USERNAME"),
        (
            {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"},
            "the server refused user 'admin': check MLFLOW_TRACKING_PASSWORD",
        ),
    ]:
        start = time.monotonic()
        out = call_stage(
            "train", repo, "--readout", "state_h", env={"MLFLOW_TRACKING_URI": uri, **credentials}
        )
        assert message in one_error(out) and out.returncode == 2
        assert time.monotonic() - start < 120  # seconds, not a training run
        assert not (repo / "models").exists()

    call_stages(repo, REPRO[2:], {"MLFLOW_TRACKING_URI": uri, **login(ADMIN[0])})
    registry = json.loads((repo / "reports/registry.json").read_text())
    assert registry["decision"] == "champion"

    # Users the admin made: one may only read the experiment (the server's default), one is
    # denied it. Both are stopped before training, in one line that says what to ask for.
    auth = get_app_client("basic-auth", tracking_uri=uri)
    with as_user():
        experiment = MlflowClient(uri).get_experiment_by_name(store.EXPERIMENT).experiment_id
        for user in ("reader", "denied"):
            auth.create_user(user, login(user)["MLFLOW_TRACKING_PASSWORD"])
        auth.grant_user_permission("denied", "experiment", experiment, "DENY")

    def train_as(user: str) -> subprocess.CompletedProcess[str]:
        env = {"MLFLOW_TRACKING_URI": uri, **login(user)}
        return call_stage("train", repo, "--readout", "state_h", env=env)

    for user in ("reader", "denied"):
        out = train_as(user)
        error = one_error(out)
        assert f"the server denies user '{user}' this" in error and out.returncode == 2, error
        assert "ask its admin for EDIT permission" in error
        assert "epoch" not in out.stderr

    # The admin grants EDIT on the experiment, and the user can train.
    with as_user():
        auth.grant_user_permission("reader", "experiment", experiment, "EDIT")
    out = train_as("reader")
    assert out.returncode == 0, out.stderr


def test_the_decision_lock_lets_one_stage_decide_at_a_time_across_clients(
    module_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machines that share only the server: 6 clients at once, never two inside the lock."""
    server, name = module_server, "lock-test"  # a registered model no other test here uses
    inside, most, entered = 0, 0, 0
    guard = threading.Lock()

    def decide() -> None:
        nonlocal inside, most, entered
        client = MlflowClient(server)  # one client each, as on separate machines
        with register.decision_lock(client, server, name):
            with guard:
                inside, entered = inside + 1, entered + 1
                most = max(most, inside)
            time.sleep(0.3)
            with guard:
                inside -= 1

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(decide) for _ in range(6)]:
            future.result()
    assert (entered, most) == (6, 1)
    client = MlflowClient(server)
    assert client.search_registered_models(f"name LIKE '{name}%'") == []  # released

    client.create_registered_model(f"{name}.lock")  # left behind by a killed stage
    monkeypatch.setattr(register, "STALE_LOCK", 1)
    time.sleep(1.5)
    with register.decision_lock(client, server, name):
        assert client.get_registered_model(f"{name}.lock").description == register.LOCK_NOTE
