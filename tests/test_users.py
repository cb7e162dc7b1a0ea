"""A team of several users on a tracking server with logins (docs/team.md's grants, command by
command): two non-admin users train and register into one model.

PostgreSQL comes from .ci/run, as for tests/test_server.py. Its own module, so that a parallel
test run (pytest-xdist, one module per worker) puts it beside test_server.py, not after it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    ADMIN,
    REPRO,
    as_user,
    call_stage,
    call_stages,
    copy_project,
    login,
    one_error,
    sh,
)
from mlflow.cli import cli
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from pipeline import register, store
from pipeline.stage import ConfigError

pytestmark = pytest.mark.slow
SMALL = {
    "data": {"source": "bundled"},
    "train": {"epochs": 1},
    "readouts": ["state_h"],
    "model": {"units": 16, "input_units": 16},
    # the best must end champion, whatever its gain: alpha 1.0 is the rule without a test
    "registry": {"alpha": 1.0},
}


def test_two_users_train_and_register_into_one_model_with_the_grants_of_docs_team(
    auth_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/team.md's users, command by command: the admin makes the experiment and two users;
    each runs the pipeline in their own clone into one registered model. Bob first gets EDIT on
    the experiment only (what the page used to say): his register stage is refused in one line,
    after training, until the admin grants the registered model too; then register succeeds.
    The stages run in process, as `dvc repro` runs them (it hands them the login in the
    environment as it is): the grants are the point."""
    uri, folder = auth_server
    admin = {"MLFLOW_TRACKING_URI": uri, **login(ADMIN[0])}

    def mlflow_cli(*args: str) -> str:
        """`mlflow ...` as the admin, run in process: the same click command."""
        out = CliRunner().invoke(cli, args, env=admin, catch_exceptions=False)
        assert out.exit_code == 0, out.output
        return out.output

    mlflow_cli("experiments", "create", "--experiment-name", store.EXPERIMENT)
    listed = mlflow_cli("experiments", "search")
    (experiment,) = [line.split()[0] for line in listed.splitlines() if store.EXPERIMENT in line]

    auth = get_app_client("basic-auth", tracking_uri=uri)
    with as_user():
        for user in ("alice", "bob"):
            auth.create_user(user, login(user)["MLFLOW_TRACKING_PASSWORD"])
        auth.grant_user_permission("alice", "experiment", experiment, "EDIT")
        auth.grant_user_permission("alice", "registered_model", "rnn-mnist", "EDIT")
        auth.grant_user_permission("bob", "experiment", experiment, "EDIT")  # not the model, yet

    for user, seed in (("alice", 1), ("bob", 2)):  # two machines, two different models
        copy_project(tmp_path / user, SMALL | {"seed": seed})
    alice, bob = ({"MLFLOW_TRACKING_URI": uri, **login(user)} for user in ("alice", "bob"))
    call_stages(tmp_path / "alice", REPRO, alice)  # the first: her register creates the model

    call_stages(tmp_path / "bob", REPRO[:-1], bob)  # trained and evaluated
    error = one_error(call_stage("register", tmp_path / "bob", env=bob))
    assert "the server denies user 'bob' this" in error and "model-versions/create" in error
    assert "on the registered model, for register" in error, error
    assert (tmp_path / "bob/eval/state_h/metrics.json").exists()  # trained and evaluated
    assert not (tmp_path / "bob/reports/registry.json").exists()

    with as_user():
        auth.grant_user_permission("bob", "registered_model", "rnn-mnist", "EDIT")
    out = call_stage("register", tmp_path / "bob", env=bob)
    assert out.returncode == 0, out.stderr[-3000:]

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
