"""The one place that configures MLflow.

Default: an embedded SQLite store `mlflow.db` and artifacts in `mlruns/`, both in the repository
root, so that `mlflow ui` started there shows every run. Runs of `dvc exp run --temp/--queue`
execute in a copy under .dvc/tmp/exps and still land in the root's store.
MLFLOW_TRACKING_URI switches to a tracking server; MLFLOW_EXPERIMENT_NAME picks the experiment.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from filelock import FileLock
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from pipeline.stage import ConfigError

if TYPE_CHECKING:
    import keras
    import numpy as np

EXPERIMENT = "rnn-mnist-sequences"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
SERVER_TIMEOUT = 5.0  # seconds a tracking server gets to answer before a stage gives up


def project_root() -> Path:
    """The repository root: from any folder inside it, and from a `dvc exp run --temp` copy."""
    if dvc_root := os.environ.get("DVC_ROOT"):  # set by DVC for the stages it runs
        root = Path(dvc_root).resolve()
    else:  # the nearest folder up from here that holds .dvc/
        here = Path.cwd().resolve()
        root = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (a server that must answer), else the root's mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def configure() -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    root = project_root()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    local = uri.startswith("sqlite:")
    # Parallel stages (`dvc queue start -j 2`) would race MLflow's creation of a new SQLite store
    # (its schema migrations) and of the experiment: the lock serialises that first contact.
    with store_lock(uri):
        if local and (database := make_url(uri).database):
            check_store(Path(database))  # inside the lock: never sees a store half created
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # Fix the artifact folder to the root now: MLflow would otherwise pick ./mlruns
            # relative to wherever the first run starts (a temp copy that DVC deletes).
            location = (root / "mlruns").as_uri() if local else None
            try:
                return mlflow.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # a tracking server's other client won
                experiment = mlflow.get_experiment_by_name(name)
                assert experiment is not None
    return experiment.experiment_id


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock that parallel stages on this machine share, for the embedded store (else none)."""
    if uri.startswith("sqlite:"):
        return FileLock(project_root() / ".mlflow.db.lock")
    return contextlib.nullcontext()


def params_hash(params: dict[str, str]) -> str:
    """Names the exact configuration: the same logged params give the same hash, in any store."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def check_server(uri: str) -> None:
    """Fail in seconds, before any training, if no tracking server answers at `uri` or it
    refuses this client's login (MLflow's basic-auth answers 401 or 403)."""
    seconds = SERVER_TIMEOUT
    # An API call, not /health: a server with logins lets anyone see /health.
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    elif user:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(login).decode()}")
    try:
        urllib.request.urlopen(request, timeout=seconds).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            who = (
                f"refused user {user!r}: check MLFLOW_TRACKING_PASSWORD"
                if user
                else ("asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            )
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: the server {who} (HTTP 401)") from None
        if exc.code == 403:
            raise ConfigError(
                f"MLFLOW_TRACKING_URI={uri}: user {user!r} may not read experiments there "
                "(HTTP 403): ask the server's admin for permission"
            ) from None
        return  # another answer (an older server without this endpoint?): a server is there
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered within {seconds:g} s "
            f"({reason}). Start one (mlflow server --host 127.0.0.1 --port 5000), fix the URI, "
            "or unset MLFLOW_TRACKING_URI to use the embedded store mlflow.db"
        ) from None


def check_store(path: Path) -> None:
    """Refuse, in one line, an SQLite store that MLflow cannot use as it is, leaving it untouched.

    MLflow meets a truncated or foreign file, or another MLflow's schema, with a long SQLAlchemy
    traceback, and fills an SQLite file lacking its tables with them (an unrelated database, or an
    old store it migrates in place). So the file is read here first, read-only. Missing or empty is
    fine: MLflow creates the store.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    fix = "move it away (MLflow then starts a new store) or restore a backup copy"
    revisions: list[str] = []
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            check = " ".join(db.execute("PRAGMA quick_check(1)").fetchone()[0].split())
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "alembic_version" in tables:
                revisions = [r for (r,) in db.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorname", None) or ""
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY")):
            return  # in use, or a crashed writer's journal that only MLflow's rw connection rolls back
        raise ConfigError(f"{path} is not a readable SQLite database ({exc}): {fix}") from None
    if check != "ok":
        raise ConfigError(f"{path} is corrupt (PRAGMA quick_check: {check}): {fix}")
    if not tables - {"alembic_version"}:
        return  # no tables yet: MLflow creates them, as in a new file
    if not revisions:  # no alembic_version (or an empty one) beside other tables
        raise ConfigError(f"{path} is an SQLite database but not an MLflow store: {fix}")
    from alembic.script import ScriptDirectory  # lazily, as MLflow does: ~0.3 s of imports
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(""))  # MLflow's own migrations
    head, found = script.get_current_head(), ", ".join(revisions)
    if revisions == [head]:
        return
    if set(revisions) <= {s.revision for s in script.walk_revisions()}:
        raise ConfigError(
            f"{path} has an older MLflow schema ({found}; MLflow {mlflow.__version__} needs "
            f"{head}): back it up, then run `mlflow db upgrade sqlite:///{path.resolve()}`"
        )
    raise ConfigError(
        f"{path} has MLflow schema {found}, unknown to MLflow {mlflow.__version__} (head {head}): "
        f"upgrade MLflow to the version that wrote it, or {fix}"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def run_tags(readout: str, meta: dict) -> dict[str, str]:
    """Tags that let runs be grouped and trusted: what was read out, from which data and code."""
    source = meta["source"]
    commit = git_commit()
    tags = {
        "readout": readout,
        "data.source": source["source"],
        "data.dataset": source["dataset"],
        "data.sha256": meta["sha256"],
        "sequence.order": meta["order"],
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
    }
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    return tags


class MetricBuffer:
    """Collects metric points in memory and sends them with log_batch, 1,000 per request.

    One log_metric call per batch would cost 10-30 % of training time; a flush per epoch ~1 %.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        self.pending: list[Metric] = []
        self.seconds = 0.0  # time spent in flush(), to show what logging costs

    def add(self, key: str, value: float, step: int) -> None:
        self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))

    def dump(self) -> list[list]:
        """The unsent points, as JSON-able rows for a checkpoint."""
        return [[m.key, m.value, m.step, m.timestamp] for m in self.pending]

    def restore(self, rows: list[list]) -> None:
        self.pending = [Metric(key, value, timestamp, step) for key, value, step, timestamp in rows]

    def flush(self, skip_logged: bool = False) -> None:
        """Send the pending points; with skip_logged, only those whose (key, step) the run lacks."""
        start = time.perf_counter()
        if skip_logged and self.pending:
            logged = {
                (m.key, m.step)
                for key in {m.key for m in self.pending}
                for m in self.client.get_metric_history(self.run_id, key)
            }
            self.pending = [m for m in self.pending if (m.key, m.step) not in logged]
        for i in range(0, len(self.pending), MAX_METRICS_PER_REQUEST):
            chunk = self.pending[i : i + MAX_METRICS_PER_REQUEST]
            self.client.log_batch(self.run_id, metrics=chunk)
        self.pending.clear()
        self.seconds += time.perf_counter() - start


class _KerasWithExample:
    """mlflow.keras.save_model, into a folder created first.

    Works around mlflow#16183: log_model(input_example=...) writes the example before the model
    folder exists and fails with FileNotFoundError (MLflow 3.17-3.18).
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: object) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


@contextlib.contextmanager
def run(
    experiment_id: str, run_id: str | None, name: str, params: dict, tags: dict[str, str]
) -> Iterator[str]:
    """Start a run (or resume run_id) with its params and tags; yield its id.

    It ends FINISHED when the block completes, KILLED on Ctrl-C or SIGTERM (KeyboardInterrupt),
    FAILED on any other exception. (mlflow.start_run's own context manager knows no KILLED.)
    """
    active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=name)
    try:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.set_tags(tags)
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def mark_killed(run_id: str | None) -> None:
    """End a run that can never be finished (its checkpoint is for other params or data)."""
    if run_id is not None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            MlflowClient().set_terminated(run_id, "KILLED")


def log_cost(seconds: float, samples: int, logging_seconds: float) -> None:
    """What training cost: time, throughput, time spent sending metrics, peak memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mlflow.log_metrics(
        {
            "train_seconds": seconds,
            "samples_per_second": samples / seconds,
            "logging_seconds": logging_seconds,  # within train_seconds
            "peak_rss_mib": peak / (1024 * 1024 if sys.platform == "darwin" else 1024),
        }
    )


def log_model(model: keras.Model, example: np.ndarray) -> str:
    """Log the Keras model to the active run with its signature and an input example; its URI."""
    from mlflow.models import Model, infer_signature

    from pipeline.tf import keras, tf

    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasWithExample,
        flavor_name="keras",
        model=model,
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        # Given, not inferred: inference re-imports the model in a subprocess (~10 s).
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )
    return info.model_uri
