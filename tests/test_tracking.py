"""MLflow configuration: where the store is, where artifacts go, and buffered metric logging."""

import base64
import contextlib
import hashlib
import http.server
import io
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import mlflow
import pytest
from helpers import (
    GIT,
    call_stage,
    clean_env,
    free_port,
    one_error,
    sh,
    working_in,
    write_params,
    write_prepared,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.tracking import MlflowClient

from pipeline import store, tracking
from pipeline.stage import ConfigError, exit_code


def test_project_root_is_the_workspace_even_inside_a_dvc_temp_copy(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.project_root() == isolated
    temp_copy = isolated / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert store.project_root() == isolated
    (isolated / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(isolated / "sub" / "dir")  # from any folder inside the repository
    assert store.project_root() == isolated
    monkeypatch.setenv("DVC_ROOT", str(isolated / "elsewhere"))
    assert store.project_root() == isolated / "elsewhere"


def test_default_store_is_sqlite_in_the_root_with_artifacts_beside_it(isolated: Path) -> None:
    experiment_id = store.configure()
    assert mlflow.get_tracking_uri() == f"sqlite:///{isolated / 'mlflow.db'}"
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == store.EXPERIMENT
    assert experiment.artifact_location == (isolated / "mlruns").as_uri()
    assert store.configure() == experiment_id  # found again, not created twice


def test_environment_picks_another_store_and_experiment(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{isolated / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    experiment_id = store.configure()
    assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_experiment(experiment_id).name == "sweep"
    assert not (isolated / "mlflow.db").exists()


# Provenance: whether the run's params and code are those of git.commit, in a real git repo.

META = {"source": {"source": "bundled", "dataset": "mnist"}, "sha256": "0" * 64, "order": "rows"}
COMMITTED = {"params.yaml": "lr: 1\n", "pipeline/train.py": "x = 1\n", "dvc.yaml": "stages: {}\n"}
EDITS = {  # files written after the commit: what git.dirty must say
    "nothing": ({}, "false"),
    "params edited": ({"params.yaml": "lr: 2\n"}, "params"),
    "code edited": ({"pipeline/train.py": "x = 2\n"}, "code"),
    "both": ({"params.yaml": "lr: 2\n", "dvc.yaml": "stages: {a: {cmd: b}}\n"}, "params,code"),
    "untracked module": ({"pipeline/new.py": "y = 1\n"}, "code"),
    "outputs and data only": (
        {"data/raw/x.csv": "1\n", "models/state_h/run.json": "{}", "dvc.lock": "x: 1\n"},
        "false",
    ),
}


def git_repo(root: Path) -> str:
    """COMMITTED in a fresh git repository at root; its commit."""
    for name, text in COMMITTED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    sh("git", "init", "-q", cwd=root)
    sh(*GIT, "add", "-A", cwd=root)
    sh(*GIT, "commit", "-qm", "baseline", cwd=root)
    return sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("edit", EDITS)
def test_run_tags_say_whether_params_or_code_differ_from_the_commit(
    isolated: Path, edit: str
) -> None:
    commit = git_repo(isolated)
    files, dirty = EDITS[edit]
    write(isolated, files)
    tags = tracking.run_tags("state_h", META)
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["git.dirty"] == dirty
    assert tags["dvc.exp_name"] == ""  # a workspace run
    if dirty == "false":
        assert "git.diff_sha256" not in tags
    elif edit != "untracked module":  # what a user gets from git diff HEAD on the same paths
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--binary", "--", *sum(tracking.SOURCES.values(), ())],
            cwd=isolated,
            capture_output=True,
            check=True,
        ).stdout
        assert tags["git.diff_sha256"] == hashlib.sha256(diff).hexdigest()


def test_the_diff_hash_follows_the_content_of_untracked_modules_too(isolated: Path) -> None:
    commit = git_repo(isolated)
    hashes = []
    for text in ("y = 1\n", "y = 2\n", "y = 1\n"):
        write(isolated, {"pipeline/new.py": text})
        hashes.append(tracking.git_state()["git.diff_sha256"])
    assert hashes[0] == hashes[2] != hashes[1]
    (isolated / "pipeline/new.py").unlink()
    assert tracking.git_state() == {"git.commit": commit, "git.dirty": "false"}


def test_a_project_in_a_subfolder_of_the_repository(isolated: Path) -> None:
    git_repo(isolated)
    project = isolated / "project"  # paths are the project's, git status names them from the top
    write(project, COMMITTED)
    sh(*GIT, "add", "-A", cwd=isolated)
    sh(*GIT, "commit", "-qm", "project", cwd=isolated)
    write(project, {"pipeline/new.py": "y = 1\n"})
    write(isolated, {"params.yaml": "lr: 3\n"})  # the top's params are not the project's
    with working_in(project):
        assert tracking.git_state()["git.dirty"] == "code"


def test_a_dvc_experiment_is_clean_but_for_untracked_files(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dvc exp run applies -S and the workspace's edits over the baseline and commits them all
    into the experiment (checked with DVC 3.67 in workspace, --temp and --queue runs); untracked
    files stay out of that commit."""
    commit = git_repo(isolated)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lamb")
    write(isolated, {"params.yaml": "lr: 2\n", "pipeline/train.py": "x = 2\n"})
    tags = tracking.run_tags("state_h", META)
    assert (tags["git.commit"], tags["git.dirty"], tags["dvc.exp_name"]) == (
        commit,
        "false",
        "lucky-lamb",
    )
    write(isolated, {"pipeline/new.py": "y = 1\n"})
    assert tracking.git_state()["git.dirty"] == "code"


def test_one_git_call_when_clean_two_when_dirty(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_repo(isolated)
    calls = []
    real = subprocess.run

    def counting(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(command)
        assert kwargs["timeout"] == tracking.GIT_TIMEOUT
        return real(command, **kwargs)

    monkeypatch.setattr(tracking.subprocess, "run", counting)
    tracking.git_state()
    assert len(calls) == 1
    write(isolated, {"params.yaml": "lr: 2\n", "pipeline/new.py": "y = 1\n"})
    tracking.git_state()
    assert len(calls) == 3


def test_without_git_or_a_commit_the_state_is_unknown(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(isolated.parent))  # tmp_path is no repo
    unknown = {"git.commit": "unknown", "git.dirty": "unknown"}
    assert tracking.git_state() == unknown  # not a repository
    sh("git", "init", "-q", cwd=isolated)
    write(isolated, COMMITTED)
    assert tracking.git_state() == unknown  # no commit yet
    git_repo(isolated)
    monkeypatch.setenv("PATH", str(isolated / "no-git-here"))
    assert tracking.git_state() == unknown  # no git program
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)  # DVC knows the commit
    assert tracking.git_state() == {"git.commit": "a" * 40, "git.dirty": "unknown"}


def test_metric_buffer_sends_everything_in_chunks_of_at_most_1000(isolated: Path) -> None:
    experiment_id = store.configure()
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    buffer = tracking.MetricBuffer(run_id)
    for step in range(2500):
        buffer.add("batch_accuracy", step / 2500, step)
    assert client.get_metric_history(run_id, "batch_accuracy") == []  # nothing sent yet
    buffer.flush()
    history = client.get_metric_history(run_id, "batch_accuracy")
    assert sorted(m.step for m in history) == list(range(2500))
    assert buffer.pending == [] and buffer.seconds > 0


def test_an_unreachable_tracking_server_fails_fast_with_a_fix(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1.*unset"):
        store.configure()
    assert time.monotonic() - start < 30  # seconds, not the minutes of a hanging client


def test_a_silent_tracking_server_fails_within_the_timeout(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(store, "SERVER_TIMEOUT", 0.5)  # the patch is what configure() waits
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"no MLflow server answered within 0\.5 s"):
        store.configure()
    assert time.monotonic() - start < 30  # not the 5 s default nor a hang (kept loose for CI)
    listener.close()


@pytest.mark.slow  # four processes importing MLflow together: ~12 s
def test_parallel_stages_creating_a_fresh_store_at_once_all_succeed(isolated: Path) -> None:
    """Without the lock, MLflow's schema migrations race (alembic CommandError) and stages die."""
    code = (
        "import sys, time\n"
        "from pipeline import store\n"
        "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"  # start together
        "print(store.configure())\n"
    )
    start_at = str(time.time() + 8)  # after every process has imported MLflow
    env = clean_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, start_at],
            cwd=isolated,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, found by all


# A damaged mlflow.db: one line naming the file and the fix, before training, the file untouched.

UNKNOWN_REVISION = "ffffffffffff"  # no MLflow migration has this id: "written by a newer MLflow"
OLDER_REVISION = "75868b020152"  # mlflow/store/db_migrations/versions: the one before 3.17's head


@pytest.fixture(scope="module")
def intact_store(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a real store made by store.configure(), built once for the damage tests."""
    root = tmp_path_factory.mktemp("intact")
    with working_in(root):
        store.configure()
    return (root / "mlflow.db").read_bytes()


def set_revision(db: Path, revision: str) -> None:
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    con.close()


def unrelated_database(db: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        con.execute("INSERT INTO notes (text) VALUES ('not MLflow')")
    con.close()


DAMAGES = {  # name: (how to damage a copy of the intact store, what the message must say)
    "truncated": (lambda db, ok: db.write_bytes(ok[: len(ok) // 2]), "malformed.*move it away"),
    "garbage": (lambda db, ok: db.write_bytes(random.Random(0).randbytes(len(ok))), "move it away"),
    "text": (lambda db, ok: db.write_text("run,accuracy\n1,0.98\n" * 50), "move it away"),
    "newer": (
        lambda db, ok: (db.write_bytes(ok), set_revision(db, UNKNOWN_REVISION)),
        f"{UNKNOWN_REVISION}, unknown to MLflow.*upgrade MLflow",
    ),
    "older": (
        lambda db, ok: (db.write_bytes(ok), set_revision(db, OLDER_REVISION)),
        f"older MLflow schema \\({OLDER_REVISION}.*mlflow db upgrade sqlite:///",
    ),
    "unrelated": (lambda db, ok: unrelated_database(db), "not an MLflow store.*move it away"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_store_fails_in_one_line_and_is_left_untouched(
    isolated: Path, intact_store: bytes, damage: str
) -> None:
    db = isolated / "mlflow.db"
    make, expected = DAMAGES[damage]
    make(db, intact_store)
    os.utime(db, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9))  # 2001: any write shows
    before, mtime = db.read_bytes(), db.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=expected) as info:
        store.configure()
    message = str(info.value)
    assert message.startswith(str(db)) and "\n" not in message
    assert db.read_bytes() == before and db.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in isolated.iterdir()) == [".mlflow.db.lock", "mlflow.db"]


def test_an_intact_store_a_new_one_and_a_crashed_writers_journal_pass_the_check(
    isolated: Path,
) -> None:
    db = isolated / "mlflow.db"
    db.write_bytes(b"")  # empty: MLflow creates the store in it
    experiment_id = store.configure()
    store.check_store(db)
    # A writer killed mid-transaction leaves a hot journal: a read-only connection cannot roll
    # it back (SQLITE_READONLY_ROLLBACK), MLflow's read-write one does; so this is no damage.
    crash = (
        "import os, sqlite3\n"
        "con = sqlite3.connect('mlflow.db', isolation_level=None)\n"
        "con.execute('PRAGMA cache_size = 1')\n"  # spill changed pages into the file itself
        "con.execute('BEGIN')\n"
        "con.execute('CREATE TABLE big (x BLOB)')\n"
        "con.executemany('INSERT INTO big VALUES (randomblob(4000))', [()] * 200)\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", crash], cwd=isolated, check=False)
    assert (isolated / "mlflow.db-journal").exists()
    assert store.configure() == experiment_id
    assert not (isolated / "mlflow.db-journal").exists()  # rolled back by MLflow


def test_train_on_a_corrupt_store_exits_2_with_one_error_line_before_training(
    tmp_path: Path,
) -> None:
    write_params(tmp_path, {"readouts": ["state_h"]})
    write_prepared(tmp_path)
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)  # a header, then garbage
    before, mtime = db.read_bytes(), db.stat().st_mtime_ns
    out = call_stage("train", tmp_path, "--readout", "state_h")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and "mlflow.db" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()
    assert db.read_bytes() == before and db.stat().st_mtime_ns == mtime


class LoginServer(http.server.BaseHTTPRequestHandler):
    """Answers like MLflow's basic-auth app: /health for anyone, the API only for alice:secret
    (and 403 for bob, who may not read experiments)."""

    def do_GET(self) -> None:
        logins = {"alice:secret": 200, "bob:secret": 403}
        given = self.headers.get("Authorization", "").removeprefix("Basic ")
        login = base64.b64decode(given).decode() if given else ""
        code = 200 if self.path == "/health" else logins.get(login, 401)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("login", "message"),
    [
        (
            None,
            "the server asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
        (("alice", "wrong"), "the server refused user 'alice': check MLFLOW_TRACKING_PASSWORD"),
        (("bob", "secret"), "user 'bob' may not read experiments there (HTTP 403)"),
        (("alice", "secret"), None),
    ],
)
def test_a_server_that_refuses_the_login_stops_the_stage_in_one_line(
    isolated: Path,
    monkeypatch: pytest.MonkeyPatch,
    login: tuple[str, str] | None,
    message: str | None,
) -> None:
    """/health answers anyone on a server with logins, so the check asks the API with the login."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    if login:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
    try:
        if message is None:
            store.check_server(uri)  # the login works: no error
        else:
            with pytest.raises(ConfigError, match=re.escape(message)):
                store.check_server(uri)
    finally:
        server.shutdown()
        server.server_close()


def test_a_password_never_reaches_a_message(isolated: Path) -> None:
    """A login in the URI is refused in one line that hides the password (the check used to
    print it and say "Name or service not known" although the server answered; MLflow's client
    would send it, but prints the URI whole in its errors); so is a database as migrate's target."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    (isolated / "mlflow.db").touch()  # migrate's source: checked only after its target
    try:
        with_login = {"MLFLOW_TRACKING_URI": f"http://alice:secret@{host}"}
        lines = [
            one_error(call_stage("report", isolated, env=with_login)),
            one_error(call_stage("migrate", isolated, "--to", f"http://alice:secret@{host}")),
            one_error(call_stage("migrate", isolated, "--from", f"http://alice:secret@{host}",
                                 "--to", f"http://{host}")),
            one_error(call_stage("migrate", isolated, "--to", "postgresql://u:secret@db/mlflow")),
        ]  # fmt: skip
        logins = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "secret"}
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": f"http://{host}", **logins}):
            store.check_server(f"http://{host}")  # the same login as the variables say: accepted
    finally:
        server.shutdown()
        server.server_close()
    assert not [line for line in lines if "secret" in line], lines
    fix = "a login in the URI is not used, as MLflow would print it in its errors: give the "
    fix += (
        "server's URI alone and the login in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert lines[:3] == [
        f"error: MLFLOW_TRACKING_URI=http://alice:***@{host}: {fix}",
        f"error: --to http://alice:***@{host}: {fix}",
        f"error: --from http://alice:***@{host}: {fix}",
    ]
    assert (
        lines[3]
        == "error: --to postgresql://u:***@db/mlflow: not a tracking server's http(s):// URL"
    )

    def denied() -> None:  # as a server's basic-auth app refuses a call mid-stage
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    err = io.StringIO()
    uri = {"MLFLOW_TRACKING_URI": "postgresql://u:secret@db/mlflow"}
    with mock.patch.dict(os.environ, uri), contextlib.redirect_stderr(err):
        assert exit_code(denied) == 2
    assert err.getvalue().startswith("error: MLFLOW_TRACKING_URI=postgresql://u:***@db/mlflow: ")


def test_a_comparison_parent_is_found_by_the_runs_it_compares_and_nests_them(
    isolated: Path,
) -> None:
    experiment_id = store.configure()
    client = MlflowClient()
    made = [client.create_run(experiment_id, start_time=t) for t in (2_000, 1_000, 3_000)]
    a, b, c = (client.get_run(r.info.run_id) for r in made)
    parent = tracking.comparison_parent([a, b], "workspace: lstm-rows readouts")
    run = client.get_run(parent)
    assert run.info.run_name == "workspace: lstm-rows readouts"
    assert run.info.start_time == 1_000  # when the first readout run started
    assert run.data.tags[tracking.COMPARES] == f"{a.info.run_id} {b.info.run_id}"
    for child in (a, b):
        assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent
    a, b = (client.get_run(r.info.run_id) for r in (a, b))
    assert tracking.comparison_parent([a, b], "renamed") == parent  # found again, not created
    # Another comparison with a run of the first: a new parent; that run stays where it was.
    other = tracking.comparison_parent([a, c], "exp-2: lstm-rows readouts")
    assert other != parent
    assert client.get_run(a.info.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(c.info.run_id).data.tags["mlflow.parentRunId"] == other
    assert len(client.search_runs([experiment_id])) == 5


def test_a_table_logged_again_is_replaced_not_appended(isolated: Path) -> None:
    experiment_id = store.configure()
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    for accuracy in (0.5, 0.75):
        tracking.log_table(run_id, {"class": [0, 1], "accuracy": [accuracy, 1.0]}, "t.json")
    # MLflow reads it as one of its own tables.
    table = MlflowClient().load_table(experiment_id, "t.json", [run_id], ["run_id"])
    assert table.to_dict("list") == {"class": [0, 1], "accuracy": [0.75, 1], "run_id": [run_id] * 2}
    tags = MlflowClient().get_run(run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "t.json", "type": "table"}]


def test_the_replicate_key_leaves_out_the_training_seed_and_what_cannot_change_a_model() -> None:
    logged = {"seed": "42", "model.cell": "lstm", "train.lr": "0.001", "train.seed": "1"}
    key = tracking.replicate_key(logged, "state_h", "a" * 64)
    others = {
        "train.seed": "2",
        "readouts": "['state_h', 'output_last']",
        "registry.name": "rnn-x",
        "registry.min_improvement": "0.01",
        "data.timeout": "5",
        "train.log_every_n_batches": "10",
    }
    for name, value in others.items():
        assert tracking.replicate_key(logged | {name: value}, "state_h", "a" * 64) == key, name
    old = {k: v for k, v in logged.items() if k != "train.seed"}  # from before train.seed
    assert tracking.replicate_key(old, "state_h", "a" * 64) == key
    assert tracking.effective_seed(old) == "42"
    assert tracking.effective_seed(logged | {"train.seed": "None"}) == "42"  # null: seed
    assert tracking.effective_seed(logged) == "1"
    for changed in (
        tracking.replicate_key(logged | {"seed": "7"}, "state_h", "a" * 64),  # other data split
        tracking.replicate_key(logged | {"train.lr": "0.01"}, "state_h", "a" * 64),
        tracking.replicate_key(logged, "output_last", "a" * 64),
        tracking.replicate_key(logged, "state_h", "b" * 64),  # other data, the same params
    ):
        assert changed != key
