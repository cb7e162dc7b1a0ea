"""The one place that configures MLflow.

Default: an embedded SQLite store `mlflow.db` and artifacts in `mlruns/`, both in the repository
root, so that `mlflow ui` started there shows every run. Runs of `dvc exp run --temp/--queue`
execute in a copy under .dvc/tmp/exps and still land in the root's store.
MLFLOW_TRACKING_URI switches to a tracking server; MLFLOW_EXPERIMENT_NAME picks the experiment.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.io import ConfigError

EXPERIMENT = "rnn-mnist-sequences"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
SERVER_TIMEOUT = 5.0  # seconds a tracking server gets to answer before a stage gives up


def project_root() -> Path:
    """The repository root, also from inside a `dvc exp run --temp/--queue` copy."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
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
    # (its schema migrations) and of the experiment: a file lock serialises that first contact.
    with FileLock(root / ".mlflow.db.lock") if local else contextlib.nullcontext():
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


def check_server(uri: str, seconds: float = SERVER_TIMEOUT) -> None:
    """Fail in seconds, before any training, if no tracking server answers at `uri`."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=seconds).close()
    except urllib.error.HTTPError:
        return  # it answered (perhaps asking for credentials): a server is there
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered within {seconds:g} s "
            f"({reason}). Start one (mlflow server --host 127.0.0.1 --port 5000), fix the URI, "
            "or unset MLFLOW_TRACKING_URI to use the embedded store mlflow.db"
        ) from None


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
