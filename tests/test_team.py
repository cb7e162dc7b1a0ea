"""A team on several machines (docs/team.md), each machine a clone: one tracking server on
PostgreSQL, one DVC remote (a folder), one git remote (a bare repository).

Machine A runs the baseline and pushes it (git and DVC). Machine B clones and pulls it. Each queues
an experiment and both run at the same time against the same server while two readers poll it
(two machines' writers at once; tests/test_concurrency.py runs two at once on one machine);
A shares one experiment through git, B pulls it. Machine C clones, pulls, retrains nothing and
classifies images with the pulled model.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    GIT,
    TRAINED,
    assert_quiet,
    call_stage,
    clean_env,
    copy_project,
    find_exp,
    poll,
    sh,
    start_queue,
    wait_for_queue,
)
from mlflow.tracking import MlflowClient

from pipeline import store

pytestmark = pytest.mark.slow
# A small network: what is shared and tracked is the point here, not what it learns.
PARAMS = {
    "data": {"source": "bundled"},
    "model": {"input_units": 16, "units": 16},
    "train": {"epochs": 1},
    "readouts": ["state_h"],
    # the best must end champion, whatever its gain: alpha 1.0 is the rule without a test
    "registry": {"alpha": 1.0},
}
LRS = {"a": ("0.003",), "b": ("0.004",)}  # not the baseline's
BATCH_KEYS = ("batch_accuracy", "batch_loss")


def test_two_machines_share_a_server_a_dvc_remote_and_experiments(
    server: str, tmp_path: Path
) -> None:
    tracked = {"MLFLOW_TRACKING_URI": server}
    env = clean_env(**tracked)

    def on(machine: Path, *cmd: str) -> str:
        if cmd[0] == "dvc":
            cmd = (sys.executable, "-m", *cmd)
        return sh(*(GIT + cmd[1:] if cmd[0] == "git" else cmd), cwd=machine, env=env).stdout

    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    sh("git", "init", "-q", "--bare", "--initial-branch=main", str(origin), cwd=tmp_path)

    # Machine A sets the project up with both remotes, runs the baseline and pushes it.
    a = copy_project(tmp_path / "a", PARAMS)
    on(a, "git", "remote", "add", "origin", str(origin))
    on(a, "dvc", "remote", "add", "--default", "team", str(remote))
    on(a, "dvc", "repro")
    on(a, "git", "add", "-A")
    on(a, "git", "commit", "-qm", "baseline")
    on(a, "dvc", "push")
    on(a, "git", "push", "-q", "origin", "HEAD:main")

    # Machine B clones and pulls; both queue an experiment and run it at the same time.
    on(tmp_path, "git", "clone", "-q", str(origin), "b")
    b = tmp_path / "b"
    on(b, "dvc", "pull")
    for machine, lrs in ((a, LRS["a"]), (b, LRS["b"])):
        on(machine, "dvc", "exp", "run", "--queue", "-S", f"train.lr={','.join(lrs)}")
    stop, reads = threading.Event(), [[], []]
    readers = [threading.Thread(target=poll, args=(server, stop, r)) for r in reads]
    for reader in readers:
        reader.start()
    try:
        for machine in (a, b):
            start_queue(machine, env, jobs=1)
        statuses = [wait_for_queue(machine, env) for machine in (a, b)]
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=60)
    for status in statuses:
        assert status.count("Success") == 1, status
    for r in reads:  # every read answered while the machines' experiments wrote
        assert len(r) > 20 and set(r) == {200}, r

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name(store.EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`dvc.exp_name` != '' AND {TRAINED}"
    )
    assert sorted(r.data.params["train.lr"] for r in runs) == sorted(LRS["a"] + LRS["b"])
    together = [r.info for r in runs]  # from train's start to register's end, both at once
    assert max(i.start_time for i in together) < min(i.end_time for i in together), together
    points = 0
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in BATCH_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(29)), (key, steps)
            points += len(steps)
    assert points == 2 * 29 * len(BATCH_KEYS)
    print(f"team: {len(runs)} runs FINISHED, {points} batch points, reads {list(map(len, reads))}")
    everything = client.search_runs([experiment.experiment_id], TRAINED)  # the baseline too
    versions = client.search_model_versions("name = 'rnn-mnist'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in everything)
    champion = client.get_model_version_by_alias("rnn-mnist", "champion")
    assert {v.tags["test_data.sha256"] for v in versions} == {champion.tags["test_data.sha256"]}
    best = max(r.data.metrics["test_accuracy"] for r in everything)
    assert float(champion.tags["test_accuracy"]) == best, [v.tags for v in versions]
    assert "rnn-mnist.lock" not in {m.name for m in client.search_registered_models()}

    # A shares one experiment through git; B pulls it and finds its run on the server.
    name = on(a, "dvc", "exp", "ls", "--name-only").split()[0]
    on(a, "dvc", "exp", "push", "origin", name)
    on(b, "dvc", "exp", "pull", "origin", name)
    shown = find_exp(json.loads(on(b, "dvc", "exp", "show", "--json")), name)
    lr = shown["params"]["params.yaml"]["data"]["train"]["lr"]
    accuracy = shown["metrics"]["eval/state_h/metrics.json"]["data"]["test_accuracy"]
    query = f"tags.dvc.exp_name = '{name}' AND {TRAINED}"
    (run,) = client.search_runs([experiment.experiment_id], query)
    assert run.data.params["train.lr"] == str(lr) and str(lr) in LRS["a"]
    assert run.data.metrics["test_accuracy"] == accuracy
    found = call_stage("report", b, "--exp", name, env=tracked)  # as docs/team.md says
    assert f"[{name}]: run {run.info.run_id}, test accuracy {accuracy}" in found.stdout, found

    # Machine C: a fresh clone gets data and models from the DVC remote and retrains nothing.
    on(tmp_path, "git", "clone", "-q", str(origin), "c")
    c = tmp_path / "c"
    on(c, "dvc", "pull")
    assert "up to date" in on(c, "dvc", "status")
    assert "Running stage" not in on(c, "dvc", "repro")
    assert len(client.search_runs([experiment.experiment_id], TRAINED)) == len(everything)
    digits = np.load(c / "data/raw/dataset.npz", allow_pickle=False)
    np.save(c / "digits.npy", digits["x_test"])
    out = sh(
        sys.executable, "-m", "pipeline.predict", "digits.npy", "--json",
        "--model", "models/state_h", cwd=c,  # no MLflow settings: the model is on disk
    )  # fmt: skip
    pulled = out.stdout
    assert_quiet(out.stderr)
    assert "AutoGraph" not in out.stderr and "input example" not in out.stderr, out.stderr
    (baseline,) = [v for v in versions if v.tags["dvc.exp_name"] == ""]
    model = f"models:/rnn-mnist/{baseline.version}"
    served = call_stage("predict", c, "digits.npy", "--json", "--model", model, env=tracked).stdout
    classes = [json.loads(line)["class"] for line in pulled.splitlines()]
    assert classes == [json.loads(line)["class"] for line in served.splitlines()]
    evaluated = json.loads((c / "eval/state_h/metrics.json").read_text())["test_accuracy"]
    assert np.mean(np.array(classes) == digits["y_test"]) == evaluated
    assert not (c / "mlflow.db").exists()
