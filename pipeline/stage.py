"""What every stage shares: the folders it reads and writes, the errors it reports, run_stage().

Paths are relative to the repository root, where DVC runs each stage; dvc.yaml names the same
folders as deps and outs. Nothing a user passes in can point a stage's output elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

RAW = Path("data/raw")  # fetch: dataset.npz, source.json
PREPARED = Path("data/prepared")  # preprocess: sequences.npz, meta.json
MODELS = Path("models")  # train: <readout>/model.keras, run.json
LOGS = Path("logs")  # train: <readout>/batches.csv, epochs.csv
CHECKPOINTS = Path("checkpoints")  # train, while a run is unfinished; not a DVC out
EVAL = Path("eval")  # evaluate: <readout>/metrics.json, per_class.csv, confusion.*
COMPARE = Path("reports/compare")  # compare: compare.md, batch_accuracy.png, readout_gap.json
REGISTRY = Path("reports/registry.json")  # register: what it registered and decided
EXPERIMENTS = Path("reports/experiments")  # python -m pipeline.report (no stage deletes it)


class ParamsError(ValueError):
    """params.yaml is missing, malformed or out of range; the message says what and where."""


class DataError(ValueError):
    """Input data is missing, corrupt or not what the stage expects."""


class ConfigError(RuntimeError):
    """The environment is not usable: e.g. no MLflow server answers, or mlflow.db is damaged."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); turn expected failures into one clear line and exit code 2."""
    try:
        main()
    except (ParamsError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # MLflow's, found by its code: fetch and preprocess never import it
        if getattr(exc, "error_code", None) != "PERMISSION_DENIED":
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        print(
            f"error: MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI')}: the server "
            f"denies user {user!r} this ({str(exc).splitlines()[0]}): ask its admin for EDIT "
            "permission on the experiment (and on the registered model, for register)",
            file=sys.stderr,
        )
        sys.exit(2)
