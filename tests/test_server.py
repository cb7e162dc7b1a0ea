"""A team's tracking server: `mlflow server` on PostgreSQL with artifacts served by the server,
with and without logins, and the real pipeline against it.

PostgreSQL comes from .ci/run, which starts the cluster and sets TEST_POSTGRES_URL; with CI set, a
missing database fails these tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    ADMIN,
    TRAINED,
    clean_env,
    copy_project,
    run_stage,
    sh,
    start_repro,
    start_server,
    stop,
    wait_for,
)
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from pipeline import register, store
from pipeline.stage import ConfigError

pytestmark = pytest.mark.slow
SMALL = {"data": {"source": "bundled"}, "train": {"epochs": 1}}


def test_dvc_repro_lands_runs_points_models_and_registry_on_the_server(
    server: str, tmp_path: Path
) -> None:
    repo = copy_project(tmp_path / "repo", SMALL)
    env = clean_env(MLFLOW_TRACKING_URI=server)
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=env)

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("rnn-mnist-sequences")
    runs = client.search_runs([experiment.experiment_id], TRAINED)
    assert sorted(r.data.tags["readout"] for r in runs) == ["output_last", "state_h"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "batch_accuracy")) == 29
        evaluated = json.loads(
            (repo / "eval" / run.data.tags["readout"] / "metrics.json").read_text()
        )
        assert run.data.metrics["test_accuracy"] == evaluated["test_accuracy"]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server stores them
    versions = client.search_model_versions("name = 'rnn-mnist'")
    assert len(versions) == 2
    assert client.get_model_version_by_alias("rnn-mnist", "champion").version == "1"
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()

    report = run_stage("report", repo, env={"MLFLOW_TRACKING_URI": server})
    assert report.returncode == 0, report.stderr
    table = (repo / "reports/experiments/report.md").read_text()
    assert table.startswith("# 2 runs")


def test_a_killed_training_resumes_into_the_same_run_on_the_server(
    server: str, tmp_path: Path
) -> None:
    params = SMALL | {"train": {"epochs": 8}, "readouts": ["state_h"]}
    repo = copy_project(tmp_path / "repo", params)
    env = clean_env(MLFLOW_TRACKING_URI=server)
    checkpoint = repo / "checkpoints/state_h/checkpoint.npz"
    process = start_repro(repo, env)
    assert wait_for(checkpoint, process)
    time.sleep(1.5)  # inside the training's ~4 s
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert checkpoint.exists(), "training had finished before the kill"  # removed at its end
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=env)

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("rnn-mnist-sequences")
    (run,) = client.search_runs([experiment.experiment_id], TRAINED)  # resumed, not a second
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "batch_accuracy"))
    assert steps == list(range(8 * 29))  # every batch once
    assert run.info.run_id == json.loads((repo / "models/state_h/run.json").read_text())["run_id"]


@pytest.fixture
def auth_server(database: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth`: its URI and working folder (where its logins live)."""
    folder = tmp_path / "auth"
    folder.mkdir()
    process, uri = start_server(database, folder, auth=True)
    yield uri, folder
    stop(process)


def login(user: str, password: str | None = None) -> dict[str, str]:
    """A login as MLflow's clients read it from the environment; users the admin made in these
    tests have the password f"{user}-Password-123"."""
    password = password or (ADMIN[1] if user == ADMIN[0] else f"{user}-Password-123")
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


@contextlib.contextmanager
def as_user(env: dict[str, str] | None = None) -> Iterator[None]:
    """Run MLflow's clients in this process with a login (the admin's by default)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or login(ADMIN[0])).items():
            patch.setenv(name, value)
        yield


def one_error(out: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a command that failed (a stage, or `dvc repro` running one)."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_a_server_with_logins_refuses_a_stage_without_one_in_seconds_and_works_with_it(
    auth_server: tuple[str, Path], tmp_path: Path
) -> None:
    uri, _ = auth_server
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    repo = copy_project(tmp_path / "repo", SMALL)
    sh(sys.executable, "-m", "pipeline.fetch", cwd=repo)
    sh(sys.executable, "-m", "pipeline.preprocess", cwd=repo)
    for credentials, message in [
        ({}, "the server asks for a login: set MLFLOW_TRACKING_USERNAME"),
        (
            {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"},
            "the server refused user 'admin': check MLFLOW_TRACKING_PASSWORD",
        ),
    ]:
        start = time.monotonic()
        out = run_stage(
            "train", repo, "--readout", "state_h", env={"MLFLOW_TRACKING_URI": uri, **credentials}
        )
        assert message in one_error(out) and out.returncode == 2
        assert time.monotonic() - start < 120  # seconds, not a training run
        assert not (repo / "models").exists()

    admin = clean_env(MLFLOW_TRACKING_URI=uri, **login(ADMIN[0]))
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=admin)
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
        return run_stage("train", repo, "--readout", "state_h", env=env)

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


def test_two_users_train_and_register_into_one_model_with_the_grants_of_docs_team(
    auth_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/team.md's users, command by command: the admin makes the experiment and two users;
    each runs `dvc repro` in their own clone into one registered model. Bob first gets EDIT on the
    experiment only (what the page used to say): his register is refused in one line, after
    training, until the admin grants the registered model too."""
    uri, folder = auth_server
    admin = clean_env(MLFLOW_TRACKING_URI=uri, **login(ADMIN[0]))
    experiments = (sys.executable, "-m", "mlflow", "experiments")
    sh(*experiments, "create", "--experiment-name", store.EXPERIMENT, cwd=tmp_path, env=admin)
    listed = sh(*experiments, "search", cwd=tmp_path, env=admin).stdout
    (experiment,) = [line.split()[0] for line in listed.splitlines() if store.EXPERIMENT in line]

    auth = get_app_client("basic-auth", tracking_uri=uri)
    with as_user():
        for user in ("alice", "bob"):
            auth.create_user(user, login(user)["MLFLOW_TRACKING_PASSWORD"])
        auth.grant_user_permission("alice", "experiment", experiment, "EDIT")
        auth.grant_user_permission("alice", "registered_model", "rnn-mnist", "EDIT")
        auth.grant_user_permission("bob", "experiment", experiment, "EDIT")  # not the model, yet

    def repro_as(user: str) -> subprocess.CompletedProcess[str]:
        env = clean_env(MLFLOW_TRACKING_URI=uri, **login(user))
        return sh(sys.executable, "-m", "dvc", "repro", cwd=tmp_path / user, env=env, check=False)

    small = SMALL | {"readouts": ["state_h"], "model": {"units": 16, "input_units": 16}}
    for user, seed in (("alice", 1), ("bob", 2)):  # two machines, two different models
        copy_project(tmp_path / user, small | {"seed": seed})
    out = repro_as("alice")  # the first: her register creates the registered model
    assert out.returncode == 0, out.stderr[-3000:]
    out = repro_as("bob")
    error = one_error(out)
    assert "the server denies user 'bob' this" in error and "model-versions/create" in error
    assert "on the registered model, for register" in error, error
    assert (tmp_path / "bob/eval/state_h/metrics.json").exists()  # trained and evaluated
    assert not (tmp_path / "bob/reports/registry.json").exists()

    with as_user():
        auth.grant_user_permission("bob", "registered_model", "rnn-mnist", "EDIT")
    out = repro_as("bob")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Running stage 'register'" in out.stdout and "Running stage 'train" not in out.stdout

    with as_user():
        client = MlflowClient(uri)
        decided = {
            u: json.loads((tmp_path / u / "reports/registry.json").read_text())
            for u in ("alice", "bob")
        }
        versions = {v.version: v for v in client.search_model_versions("name = 'rnn-mnist'")}
        champion = client.get_model_version_by_alias("rnn-mnist", "champion")
        names = {m.name for m in client.search_registered_models()}
    assert sorted(versions) == ["1", "2"] and names == {"rnn-mnist"}  # no lock left
    for user in ("alice", "bob"):
        version = versions[str(decided[user]["versions"]["state_h"])]
        run = json.loads((tmp_path / user / "models/state_h/run.json").read_text())
        assert version.run_id == run["run_id"]
    best = max(versions.values(), key=lambda v: float(v.tags["test_accuracy"]))
    assert champion.version == best.version == str(decided["bob"]["champion"])
    print(
        f"accuracies {[v.tags['test_accuracy'] for v in versions.values()]}, champion v{best.version}"
    )

    # A lock left by Alice's killed stage: Bob's stage may not delete it, and says whom to ask.
    with as_user(login("alice")):
        MlflowClient(uri).create_registered_model("rnn-mnist.lock")
    monkeypatch.setattr(register, "STALE_LOCK", 0)
    refused = "only that user or the server's admin may delete it"
    with as_user(login("bob")), pytest.raises(ConfigError, match=refused):
        register.decision_lock(MlflowClient(uri), uri, "rnn-mnist").__enter__()
    with as_user():
        MlflowClient(uri).delete_registered_model("rnn-mnist.lock")  # the admin may

    # The logins live in basic_auth.db, in the server's working folder; a backup of it has them.
    sh("sqlite3", "basic_auth.db", ".backup basic_auth.backup.db", cwd=folder)
    with contextlib.closing(sqlite3.connect(folder / "basic_auth.backup.db")) as backup:
        users = sorted(name for (name,) in backup.execute("SELECT username FROM users"))
    assert users == ["admin", "alice", "bob"]

    # The admin changes its own password (MLFLOW_AUTH_ADMIN_PASSWORD counts only at the first start).
    with as_user():
        auth.update_user_password(ADMIN[0], "Another-Adm1n-password", current_password=ADMIN[1])
    with as_user(login(ADMIN[0], "Another-Adm1n-password")):
        assert MlflowClient(uri).get_experiment(experiment).name == store.EXPERIMENT


def test_the_decision_lock_lets_one_stage_decide_at_a_time_across_clients(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machines that share only the server: 6 clients at once, never two inside the lock."""
    inside, most, entered = 0, 0, 0
    guard = threading.Lock()

    def decide() -> None:
        nonlocal inside, most, entered
        client = MlflowClient(server)  # one client each, as on separate machines
        with register.decision_lock(client, server, "rnn-mnist"):
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
    assert [m.name for m in client.search_registered_models()] == []  # released

    client.create_registered_model("rnn-mnist.lock")  # left behind by a killed stage
    monkeypatch.setattr(register, "STALE_LOCK", 1)
    time.sleep(1.5)
    with register.decision_lock(client, server, "rnn-mnist"):
        assert client.get_registered_model("rnn-mnist.lock").description == register.LOCK_NOTE
