"""pipeline/study.py and pipeline/trial.py: search spaces refused before anything runs, storages
that fail in one line, and real studies whose trials are DVC experiments and MLflow runs.

The slow tests run real workers (`python -m pipeline.study`), each trial a real `dvc exp run
--temp` of the train stage on the bundled digits: one worker on the embedded SQLite study, then
four workers in two clones on one PostgreSQL study, one of them killed with SIGKILL mid-trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from helpers import (
    GIT,
    call_stage,
    clean_env,
    copy_project,
    find_exp,
    free_port,
    one_error,
    sh,
    write_params,
)
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from pipeline import study as S
from pipeline.space import load_space
from pipeline.stage import ConfigError
from pipeline.trial import Trial, running

SPACE: dict[str, Any] = {
    "params": {"train.lr": {"low": 1e-5, "high": 1e-2, "log": True}},
    "set": {"train.epochs": 3},
}
# A small network on the bundled digits: the study's machinery is the point, not what it learns.
PARAMS = {
    "data": {"source": "bundled"},
    "model": {"input_units": 16, "units": 16},
    "train": {"epochs": 3},
    "registry": {"alpha": 1.0},
}
# Seed 1373 draws lr 0.0074 and 0.0051 first (TPE's first 10 trials are random draws, the same on
# every machine), then 1e-5 for trial 2 and 3e-5 for trial 4: far behind after 2 epochs, so the
# median pruner stops them.
STUDY = {
    "seed": 1373,
    "trials": 6,
    "params": {  # in this order: the order of the draws
        "model.units": {"low": 8, "high": 32, "log": True},
        "train.lr": {"low": 1e-5, "high": 3e-2, "log": True},
    },
    "set": {"train.epochs": 3},
}
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def write_space(root: Path, name: str, space: dict[str, Any]) -> None:
    (root / "studies").mkdir(exist_ok=True)
    YAML(typ="safe", pure=True).dump(space, root / "studies" / f"{name}.yaml")


@pytest.fixture
def project(isolated: Path) -> Path:
    write_params(isolated, PARAMS)
    return isolated


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"params": {"train.lrr": {"low": 0.1, "high": 0.2}}}, "train.lrr: not a param of params"),
        ({"params": {"train.lr": {"low": 0.01, "high": 0.01}}}, "params.train.lr: empty range"),
        ({"params": {"train.lr": {"low": 0.1, "high": 0.01}}}, "lower bound is above the upper"),
        ({"params": {"train.lr": {"low": 1e-4, "high": 2.0}}}, "train.lr: Input should be less"),
        ({"params": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "log: true needs low > 0"),
        ({"params": {"model.units": {"low": 8.5, "high": 32}}}, "model.units is an integer"),
        ({"params": {"model.cell": {"choices": ["lstm", "cnn"]}}}, "model.cell = 'cnn'"),
        ({"params": {"model.cell": {"choices": []}}}, "params.model.cell.choices: a non-empty"),
        ({"params": {"model.cell": {"low": 1, "high": 2}}}, "not a number; a range needs one"),
        ({"params": {"readouts": {"choices": [1]}}}, "readouts: set by the study"),
        ({"set": {"train.lr": 0.1}}, "train.lr: both searched (params) and fixed (set)"),
        ({"set": {"train.epochs": 0}}, "train.epochs: Input should be greater than or equal"),
        ({"sampler": "grid"}, "sampler grid: every param needs choices"),
        ({"objective": "test_accuracy"}, "objective: Input should be 'val_accuracy' or"),
        ({"params": {}}, "params: Dictionary should have at least 1 item"),
    ],
)
def test_a_bad_search_space_is_refused_in_one_line_before_anything_runs(
    project: Path, change: dict[str, Any], expected: str
) -> None:
    write_space(project, "s", SPACE | change)
    line = one_error(call_stage("study", project, "s"))
    assert line.startswith("error: studies/s.yaml: ") and expected in line, line
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


def test_an_unknown_study_names_the_ones_there_are(project: Path) -> None:
    write_space(project, "lr", SPACE)
    line = one_error(call_stage("study", project, "lr-units"))
    assert line == "error: studies/lr-units.yaml: file not found; studies here: lr"


def test_an_unreachable_database_is_one_line_within_seconds(project: Path) -> None:
    write_space(project, "s", SPACE)
    url = f"postgresql+psycopg2://someone:secret@127.0.0.1:{free_port()}/optuna"
    start = time.monotonic()
    out = call_stage("study", project, "s", "--storage", url)
    line = one_error(out)
    assert time.monotonic() - start < 10
    assert "someone:***@127.0.0.1" in line and "secret" not in out.stdout + out.stderr, line
    assert not (project / "mlflow.db").exists()


def test_a_refusing_database_is_one_line(project: Path) -> None:
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL: set TEST_POSTGRES_URL (see .ci/run)")
    write_space(project, "s", SPACE)
    wrong = sqlalchemy.make_url(url).set(password="not-the-password")
    out = call_stage("study", project, "s", "--storage", wrong.render_as_string(False))
    line = one_error(out)
    assert "password authentication failed" in line and "not-the-password" not in line, line


def test_a_changed_search_space_cannot_join_the_study_it_differs_from(project: Path) -> None:
    write_space(project, "s", SPACE)
    url = f"sqlite:///{project / 'optuna.db'}"
    S.open_study("s", load_space("s"), url, heartbeat=10)
    write_space(project, "s", SPACE | {"set": {"train.epochs": 4}})
    out = call_stage("study", project, "s", "--storage", url)
    assert "studies/s.yaml differs from the search space study 's' started with" in one_error(out)


def test_a_trial_reports_prunes_and_stops_when_its_worker_is_gone(project: Path) -> None:
    """The train stage's side, across the process boundary: by trial id in the shared storage."""
    write_space(project, "s", SPACE)
    url = f"sqlite:///{project / 'optuna.db'}"
    study, _ = S.open_study("s", load_space("s"), url, heartbeat=10)
    for value in (0.9, 0.8):  # two finished trials: the median pruner's startup
        trial = study.ask()
        trial.report(value - 0.1, 0)
        trial.report(value, 1)
        study.tell(trial, value)
    asked = study.ask()
    trial = Trial(
        "s", asked.number, asked._trial_id, url, "median", "val_accuracy", os.getpid(), None
    )
    assert Trial.from_env() is None
    assert trial.report(0, {"val_accuracy": 0.1}, last=False) is False  # warm-up: epoch 0
    assert trial.report(1, {"val_accuracy": 0.2}, last=False) is True  # behind the median
    assert study.trials[-1].intermediate_values == {0: 0.1, 1: 0.2}
    other = study.ask()
    trial = Trial(
        "s", other.number, other._trial_id, url, "median", "val_accuracy", os.getpid(), None
    )
    assert trial.report(0, {"val_accuracy": 0.1}, last=False) is False
    assert trial.report(1, {"val_accuracy": 0.2}, last=True) is False  # the last epoch: no prune
    study.tell(asked, state=optuna.trial.TrialState.PRUNED)
    # pid 2**22 + 1: above Linux's largest pid
    dead = Trial("s", other.number, other._trial_id, url, "median", "val_accuracy", 2**22 + 1, None)
    with pytest.raises(ConfigError, match=r"its worker \(pid 4194305\) has stopped"):
        dead.report(2, {"val_accuracy": 0.3}, last=False)
    study.tell(other, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ConfigError, match=r"no longer runs it \(state FAIL\)"):
        trial.report(2, {"val_accuracy": 0.3}, last=False)


def test_a_killed_process_is_not_running_before_its_parent_reaps_it() -> None:
    child = subprocess.Popen(["sleep", "30"])
    assert running(child.pid)
    child.kill()
    time.sleep(0.5)  # dead, not reaped: a zombie, to which os.kill(pid, 0) still succeeds
    assert not running(child.pid)
    child.wait()
    assert not running(child.pid)


def test_ints_stay_ints_and_floats_floats() -> None:
    trial = optuna.create_study().ask()
    assert isinstance(S.suggest(trial, "model.units", {"low": 8, "high": 32, "log": True}), int)
    assert isinstance(
        S.suggest(trial, "train.lr", {"low": 1, "high": 2}), float
    )  # the param's type
    assert S.suggest(trial, "train.global_clipnorm", {"choices": [None]}) is None


# --- real studies -------------------------------------------------------------------------------


def study_project(root: Path, space: dict[str, Any]) -> Path:
    repo = copy_project(root, PARAMS)
    write_space(repo, "s", space)
    sh(*GIT, "add", "-A", cwd=repo)
    sh(*GIT, "commit", "-qm", "study s", cwd=repo)
    return repo


def study_runs(repo: Path) -> tuple[MlflowClient, list[Any]]:
    """The MLflow client of repo's embedded store, and its runs of study s's trials."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, "tags.`study.name` = 's'")


def check_agreement(trial: optuna.trial.FrozenTrial, shown: dict, run: Any) -> None:
    """Optuna, `dvc exp show` and MLflow give a trial the same params and validation score."""
    params = shown["params"]["params.yaml"]["data"]
    for key, value in trial.params.items():
        section, name = key.split(".")
        assert params[section][name] == value
        assert run.data.params[key] == str(value)
    metrics = shown["metrics"]["logs/state_h/metrics.json"]["data"]
    last = trial.intermediate_values[max(trial.intermediate_values)]
    assert metrics["val_accuracy"] == run.data.metrics["val_accuracy"] == last
    assert metrics["pruned"] is (trial.state == optuna.trial.TrialState.PRUNED)
    if trial.state == optuna.trial.TrialState.COMPLETE:
        assert trial.value == last
    assert params["readouts"] == ["state_h"]


@pytest.mark.slow
def test_a_study_on_the_embedded_store_prunes_agrees_everywhere_and_registers_once(
    tmp_path: Path,
) -> None:
    repo = study_project(tmp_path / "repo", STUDY)
    worker = sh(sys.executable, "-m", "pipeline.study", "s", cwd=repo, timeout=900)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{repo / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state in DONE for t in trials] == [True] * 6, [t.state for t in trials]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert {2, 4} <= {t.number for t in pruned}, worker.stdout  # lr 1e-5 and 3e-5
    assert "pruned after epoch 2" in worker.stdout
    assert "study s: " in worker.stdout and "--finish" in worker.stdout

    shown = json.loads(sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=repo).stdout)
    client, runs = study_runs(repo)
    study_run = next(r for r in runs if "study.trial" not in r.data.tags)
    by_trial = {int(r.data.tags["study.trial"]): r for r in runs if "study.trial" in r.data.tags}
    assert sorted(by_trial) == list(range(6))  # one run per trial, none twice
    for trial in trials:
        run = by_trial[trial.number]
        check_agreement(trial, find_exp(shown, f"s-{trial.number}"), run)
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert run.info.status == "FINISHED" and "test_accuracy" not in run.data.metrics
        state = "PRUNED" if trial in pruned else "COMPLETE"
        assert run.data.tags["study.state"] == state
        assert (trial in pruned) == run.info.run_name.endswith(
            f"(pruned at epoch {len(trial.intermediate_values)})"
        )
    best = study.best_trial
    assert study_run.data.tags["best.trial"] == str(best.number)
    plots = {a.path for a in client.list_artifacts(study_run.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/slice.png"} <= plots
    assert "plots/param_importances.png" in plots

    # --finish: the best trial, and only it, meets the test set and the registry; once
    finish = sh(sys.executable, "-m", "pipeline.study", "s", "--finish", cwd=repo, timeout=600)
    test = json.loads((repo / "eval/state_h/metrics.json").read_text())["test_accuracy"]
    assert f"best trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy {test:.4f}" in (
        finish.stdout
    )
    client, runs = study_runs(repo)
    tested = [r for r in runs if "test_accuracy" in r.data.metrics and "study.trial" in r.data.tags]
    assert [int(r.data.tags["study.trial"]) for r in tested if r.data.tags.get("readout")] == [
        best.number
    ]
    versions = client.search_model_versions("name = 'rnn-mnist'")
    assert len(versions) == 1 and versions[0].run_id == by_trial[best.number].info.run_id
    again = sh(sys.executable, "-m", "pipeline.study", "s", "--finish", cwd=repo, timeout=600)
    assert "was registered already" in again.stdout
    assert len(client.search_model_versions("name = 'rnn-mnist'")) == 1


def start_worker(repo: Path, url: str, cpu: int) -> subprocess.Popen[str]:
    """A worker pinned to one core (so one thread per op), heartbeat every 2 s."""
    command = ["taskset", "-c", str(cpu), sys.executable, "-m", "pipeline.study", "s"]
    return subprocess.Popen(
        [*command, "--heartbeat", "2"],
        cwd=repo,
        env=clean_env(PIPELINE_STUDY_STORAGE=url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def optuna_database(postgres: tuple[Any, str]) -> Iterator[str]:
    """An empty PostgreSQL database for a study: not MLflow's, as both keep an alembic_version."""
    admin, _ = postgres
    name = f"optuna_test_{uuid.uuid4().hex[:8]}"
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield f"{os.environ['TEST_POSTGRES_URL'].rsplit('/', 1)[0]}/{name}"
    admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.slow
def test_four_workers_in_two_clones_share_a_postgresql_study_and_a_killed_ones_trial_is_retried(
    tmp_path: Path, optuna_database: str
) -> None:
    space = {**STUDY, "trials": 8, "pruner": "none"}
    a = study_project(tmp_path / "a", space)
    b = tmp_path / "b"
    sh(*GIT, "clone", "-q", str(a), str(b), cwd=tmp_path)
    workers = [start_worker(repo, optuna_database, cpu) for repo in (a, b) for cpu in (0, 1)]
    storage = optuna.storages.RDBStorage(optuna_database)
    study = None
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and time.monotonic() < deadline:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="s", storage=storage)
        except KeyError:
            continue
        running = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values
        ]
        if running:  # mid-trial: training has reported an epoch
            victim = running[0]
    assert victim is not None and study is not None, "no trial reached its first epoch"
    pid = int(victim.user_attrs["worker"].split()[1])
    killed = next(w for w in workers if w.pid == pid)
    os.kill(pid, signal.SIGKILL)
    outputs = {}
    for worker in workers:
        out, _ = worker.communicate(timeout=900)
        outputs[worker.pid] = out
    assert [w.returncode for w in workers if w is not killed] == [0, 0, 0], outputs

    trials = study.get_trials()
    states = [t.state for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert sum(s in DONE for s in states) == 8, states  # the study's count comes out right
    assert [t.number for t in failed if not t.user_attrs.get("surplus")] == [victim.number]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state in DONE and retry[0].params == victim.params
    # every trial exactly once: one DVC experiment and one finished MLflow run, in one clone
    done = sorted(t.number for t in trials if t.state in DONE)
    exps, finished = [], []
    for repo in (a, b):
        shown = json.loads(
            sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=repo).stdout
        )
        for commit in shown:
            for exp in commit.get("experiments") or []:
                assert exp.get("executor") is None, exp  # none left "Running" by the killed one
                exps += [rev["name"] for rev in exp["revs"] if rev.get("name")]
        _, runs = study_runs(repo)
        for run in runs:
            if "study.trial" in run.data.tags and run.data.tags.get("readout"):
                number = int(run.data.tags["study.trial"])
                if run.info.status == "FINISHED":
                    finished.append(number)
                else:  # the killed worker's trial: ended FAILED by its orphaned train stage
                    assert number == victim.number and run.info.status == "FAILED"
    assert sorted(exps) == sorted(f"s-{n}" for n in done)
    assert sorted(finished) == done
