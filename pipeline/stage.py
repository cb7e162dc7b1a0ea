"""What every stage shares: the folders it reads and writes, the errors it reports, run_stage().

Paths are relative to the repository root, where DVC runs each stage; dvc.yaml names the same
folders as deps and outs. Nothing a user passes in can point a stage's output elsewhere.
"""

from __future__ import annotations

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
