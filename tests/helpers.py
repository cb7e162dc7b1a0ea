"""What many tests share: running commands and stages as a user would, free ports, project copies.

Fixtures built on these live in conftest.py; module-scoped fixtures call these directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from ruamel.yaml import YAML

from pipeline import params as P
from pipeline.io import save_npz, write_json
from pipeline.stage import exit_code

ROOT = Path(__file__).resolve().parents[1]
GIT = ("git", "-c", "user.name=test", "-c", "user.email=test@localhost")
TRAINED = "tags.readout IS NOT NULL"  # runs of trained models, not the comparisons' parent runs


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's MLflow/DVC settings, able to import `pipeline`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def env_without_project(folder: Path, **extra: str) -> dict[str, str]:
    """clean_env() where this project cannot be imported, as for a user who never installed it.

    The venv may hold it as an editable install (`pip install -e .`): a sitecustomize.py written
    to folder drops that import hook, in the process and in its children (the uvicorn that
    `mlflow models serve` starts). Run from a folder that is not the project's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n\n"
        "editable = [f for f in sys.meta_path if f.__module__.startswith('__editable__')]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if f not in editable]\n"
    )
    return clean_env(**extra) | {"PYTHONPATH": str(folder)}


def sh(
    *cmd: str,
    cwd: Path,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run a command in a clean environment; with check, fail the test on a non-zero exit."""
    out = subprocess.run(
        cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def run_stage(
    stage: str, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.<stage> args` in cwd, as a user runs it; the exit code is not checked."""
    cmd = (sys.executable, "-m", f"pipeline.{stage}", *args)
    return sh(*cmd, cwd=cwd, check=False, env=clean_env(**(env or {})), timeout=300)


def call_stage(
    stage: str, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """run_stage in this process: the same exit code and output lines, without the seconds a new
    process takes to import TensorFlow and MLflow. For tests of a stage's logic; run_stage where
    the process is the point (what reaches its stderr, signals). Python-level output only."""
    main = importlib.import_module(f"pipeline.{stage}").main
    if "argv" in inspect.signature(main).parameters:  # else the stage takes no arguments
        main = functools.partial(main, list(args))
    out, err = io.StringIO(), io.StringIO()
    with (
        working_in(cwd),
        mock.patch.dict(os.environ, env or {}),  # what the stage sets in os.environ is undone
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = exit_code(main)
    return subprocess.CompletedProcess([stage, *args], code, out.getvalue(), err.getvalue())


# What `dvc repro` runs, in its order, for params with readouts [state_h] (`dvc repro --dry`)
REPRO = (
    ("fetch",),
    ("preprocess",),
    ("train", "--readout", "state_h"),
    ("evaluate", "--readout", "state_h"),
    ("compare",),
    ("register",),
)


def call_stages(repo: Path, stages: tuple[tuple[str, ...], ...], env: dict[str, str]) -> None:
    """Each stage in process (call_stage), in turn, as `dvc repro` runs them; each must succeed.
    For tests about what the stages do against a store, not about DVC."""
    for stage, *args in stages:
        out = call_stage(stage, repo, *args, env=env)
        assert out.returncode == 0, f"{stage}:\n{out.stderr[-3000:]}"


def find_exp(shown: list[dict], name: str) -> dict:
    """The experiment called name in `dvc exp show --json`."""
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name") == name:
                    return rev["data"]
    raise AssertionError(f"{name} is not in dvc exp show")


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def start_repro(
    repo: Path, env: dict[str, str] | None = None, targets: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`dvc repro [targets]` in the background, in its own process group (one killpg reaches the
    stage)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *targets],
        cwd=repo,
        env=env or clean_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until a server we started in its own session answers `url`; kill it (with what it
    started) and fail if it never does."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"{url}: the server we started did not answer within {seconds:g} s")


ADMIN = ("admin", "Adm1n-password-for-tests")  # the basic-auth server's admin in tests
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///basic_auth.db
admin_username = admin
auth_cache_ttl_seconds = 600
"""


def start_server(
    database: str, folder: Path, auth: bool = False, workers: int = 2
) -> tuple[subprocess.Popen, str]:
    """mlflow server on 127.0.0.1 and a free port, storing artifacts itself under folder; with
    `workers`, that many worker processes instead of MLflow's 4 (each costs seconds to start)."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers)]  # not 4: each imports MLflow's server at start
    # MLflow 3's server starts a job runner and seven job consumers (processes) by default; these
    # tests run no server-side jobs, and on 2 cores those processes slow everything else down.
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if auth:
        command += ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
        # MLflow's basic_auth.ini, but with its login cache on (docs/team.md): without it every
        # request hashes the password anew, ~0.4 s of the server's CPU, 2-3 min per test here.
        (folder / "basic_auth.ini").write_text(AUTH_INI)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(folder / "basic_auth.ini")
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=log, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    # its workers import all of MLflow: on 2 busy cores that can take minutes
    wait_until_up(f"{uri}/health", server, seconds=300)  # (folder / "server.log") tells why, if not
    return server, uri


def stop(server: subprocess.Popen) -> None:
    """Stop a server started in its own session, and everything it started."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a busy machine: still stop it, not leave it running
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


def wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float = 120) -> bool:
    """Whether path appears before process ends or the time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def poll(url: str, stop: threading.Event, results: list[int]) -> None:
    """Read runs over the REST API as `mlflow ui` does, every 0.5 s until stop; record statuses."""
    body = json.dumps({"experiment_ids": ["0", "1"], "max_results": 100}).encode()
    while not stop.is_set():
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                results.append(response.status)
        except urllib.error.HTTPError as exc:
            results.append(exc.code)
        except OSError:
            results.append(-1)
        time.sleep(0.5)


def start_queue(repo: Path, env: dict[str, str] | None = None, jobs: int = 2) -> None:
    """`dvc queue start -j <jobs>`, returning once the workers are started: they keep the command's
    stdout open until the queue is empty, so it goes to no pipe (a pipe would wait for them)."""
    cmd = (sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs))
    silent = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    done = subprocess.run(cmd, cwd=repo, env=env or clean_env(), timeout=300, **silent)
    assert done.returncode == 0, f"{' '.join(cmd)} in {repo}: exit {done.returncode}"


def wait_for_queue(repo: Path, env: dict[str, str] | None = None, seconds: float = 900) -> str:
    """Wait until `dvc queue status` shows nothing queued or running; return what it shows.

    Each look is a dvc process, about a second of CPU taken from the queue: one every 10 s, or
    sooner when git's refs of experiments change (an experiment ended), which costs nothing."""
    deadline = time.monotonic() + seconds
    while True:
        status = sh(sys.executable, "-m", "dvc", "queue", "status", cwd=repo, env=env).stdout
        if ("Queued" not in status and "Running" not in status) or time.monotonic() > deadline:
            return status
        refs = sh("git", "for-each-ref", "refs/exps", cwd=repo).stdout
        for _ in range(10):
            time.sleep(1)
            if sh("git", "for-each-ref", "refs/exps", cwd=repo).stdout != refs:
                time.sleep(1)  # the queue marks the experiment done just after its ref
                break


def post(url: str, body: object) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a JSON POST to a served model's /invocations, as
    `curl -d @request.json` sends it."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/invocations", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed_params() -> str:
    """params.yaml as git holds it (committed, or staged), never the workspace's: a user's own
    settings there (data.source: bundled, an applied experiment) change no test."""
    return sh("git", "show", ":params.yaml", cwd=ROOT).stdout


def params_dict(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default params with some sections (or top-level keys) overridden, as params.yaml holds."""
    params = P.Params().model_dump()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and key in params:
            params[key].update(value)
        else:
            params[key] = value
    return params


def make_params(overrides: dict[str, Any] | None = None) -> P.Params:
    return P.parse(params_dict(overrides))


def write_params(repo: Path, overrides: dict[str, Any] | None = None) -> P.Params:
    params = params_dict(overrides)
    YAML(typ="safe", pure=True).dump(params, repo / "params.yaml")
    return P.parse(params)


def copy_project(dest: Path, overrides: dict[str, Any]) -> Path:
    """The project's git-tracked files in a fresh git repo at dest, with params overridden."""
    for name in sh("git", "ls-files", cwd=ROOT).stdout.split():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    write_params(dest, overrides)
    sh("git", "init", "-q", cwd=dest)
    sh(*GIT, "add", "-A", cwd=dest)
    sh(*GIT, "commit", "-qm", "copy", cwd=dest)
    return dest


# What TensorFlow's C++ side writes at start-up (a user reads "E0000 ... CUDA error" as a failure),
# and what MLflow prints where nothing is wrong: none of it may reach a user.
NOISE = (
    *("absl::InitializeLog", "cuInit", "cuda drivers", "oneDNN", "NodeDef mentions", "0000 "),
    *("Creating initial MLflow database", "Validating input example", "already exists. Creating"),
    *("Created version", "Downloading artifacts", "Uploading artifacts", "View run "),
)


def assert_quiet(text: str) -> None:
    noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "noise where nothing is wrong:\n" + "\n".join(noisy)


def write_prepared(root: Path, n: int = 20) -> None:
    """A tiny prepared data set: n random 28x28 sequences per split, labels 0-9."""
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test")
    arrays = {f"x_{s}": rng.random((n, 28, 28), dtype=np.float32) for s in splits}
    arrays |= {f"y_{s}": (np.arange(n) % 10).astype(np.int32) for s in splits}
    save_npz(root / "data/prepared/sequences.npz", **arrays)
    source = {"source": "bundled", "dataset": "mnist"}
    meta = {"order": "rows", "sha256": "0" * 64, "source": source}
    write_json(root / "data/prepared/meta.json", meta)


SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME")


@contextlib.contextmanager
def working_in(root: Path) -> Iterator[Path]:
    """root as the working folder, without the caller's MLflow/DVC settings; restored after."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        for var in SETTINGS:
            mp.setenv(var, "")  # recorded first, so that what MLflow sets is undone as well
            mp.delenv(var)
        mp.chdir(root)
        yield root
    mlflow.set_tracking_uri(None)


def log_small_image_model(root: Path, example: np.ndarray) -> str:
    """An untrained small GRU, logged as the register stage logs a model, in root's store."""
    import keras
    import mlflow

    from pipeline import register, store
    from pipeline.model import build_model
    from pipeline.packaging import sequence_index

    store.configure()
    keras.utils.set_random_seed(0)
    (root / "models/state_h").mkdir(parents=True)
    build_model(28, 28, "gru", "state_h", 6, 5).save(root / "models/state_h/model.keras")
    with mlflow.start_run() as run:
        pass
    index = sequence_index("rows", 0)
    return register.log_image_model("state_h", run.info.run_id, index, "mnist", example)


def drawing_png(image: np.ndarray, side: int = 140) -> bytes:
    """A 28x28 digit as a user draws it: black on white, `side` px square, a PNG file's bytes."""
    from PIL import Image

    big = Image.fromarray(255 - image).resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "PNG")
    return buf.getvalue()


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


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail the test, instead of hanging the suite, if the block runs longer: SIGALRM interrupts
    even a blocking open() or read(), and pytest's failure is no OSError a reader could catch."""

    def expire(signum: int, frame: object) -> None:
        pytest.fail(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_error(out: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a command that failed (a stage, or `dvc repro` running one)."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]
