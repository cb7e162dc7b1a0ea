"""What every stage shares: the folders it reads and writes, the errors it reports, run_stage().

Paths are relative to the repository root, where DVC runs each stage; dvc.yaml names the same
folders as deps and outs. Nothing a user passes in can point a stage's output elsewhere.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

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


def redact(uri: str) -> str:
    """`uri` fit to print: its password, if any (scheme://user:password@host), becomes ***."""
    parts = urllib.parse.urlsplit(uri)
    login, at, host = parts.netloc.rpartition("@")
    user, colon, _ = login.partition(":")
    return parts._replace(netloc=f"{user}:***@{host}").geturl() if at and colon else uri


def exit_code(main: Callable[[], object]) -> int:
    """Run a stage's main() as its command does; return the exit code instead of exiting.

    0 when it returns; 2, after one `error: ...` line on stderr, for bad params, data or store;
    else the code it exits with (argparse's 2, predict's 2, train's 130 when interrupted).
    Tests call stages in process through it, without the seconds a new process takes to start.
    """
    try:
        main()
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    except (ParamsError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # MLflow's, found by its code: fetch and preprocess never import it
        if getattr(exc, "error_code", None) != "PERMISSION_DENIED":
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
        print(
            f"error: MLFLOW_TRACKING_URI={uri}: the server "
            f"denies user {user!r} this ({str(exc).splitlines()[0]}): ask its admin for EDIT "
            "permission on the experiment (and on the registered model, for register)",
            file=sys.stderr,
        )
        return 2
    return 0


def run_stage(main: Callable[[], object]) -> NoReturn:
    """`python -m pipeline.<stage>`: run its main() and exit with exit_code(main)."""
    sys.exit(exit_code(main))
