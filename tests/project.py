"""A throw-away copy of the project (git + DVC) for tests that run the real pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline import params as P

ROOT = Path(__file__).resolve().parents[1]
GIT = ("git", "-c", "user.name=test", "-c", "user.email=test@localhost")


def clean_env() -> dict[str, str]:
    """The environment without MLflow/DVC settings of the caller's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def write_params(repo: Path, overrides: dict) -> P.Params:
    params = P.Params().model_dump()
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return P.parse(params)


def copy_project(dest: Path, overrides: dict) -> Path:
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
