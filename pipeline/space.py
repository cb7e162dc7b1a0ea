"""A study's search space: studies/NAME.yaml, checked against params.yaml's schema.

Every value a trial may get (each bound, each choice, the fixed `set:` values) is validated as
params.yaml itself is, before anything runs: one ParamsError line names the key and what is
allowed. Used by pipeline/study.py.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import params as P
from pipeline.stage import ParamsError

STUDIES = Path("studies")  # studies/NAME.yaml: the search spaces, versioned with the code
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # also a DVC experiment name: NAME-<number>


class Space(BaseModel):
    """studies/NAME.yaml."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    objective: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    readout: P.Readout = "state_h"  # each trial trains this one readout
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = Field(0, ge=0, le=2**31 - 1)  # the sampler's
    pruner: Literal["median", "successive_halving", "none"] = "median"
    trials: int = Field(20, ge=1, le=10_000)  # complete + pruned trials the study runs
    params: dict[str, dict[str, Any]] = Field(min_length=1)  # key: {low, high[, log]} | {choices}
    set: dict[str, Any] = {}  # fixed for every trial, over params.yaml


def leaf_type(key: str) -> type:
    """int or float for a numeric param (a null-able one too), else object."""
    section: Any = P.Params
    *path, last = key.split(".")
    for part in path:
        section = section.model_fields[part].annotation
    kinds = typing.get_args(section.model_fields[last].annotation) or (
        section.model_fields[last].annotation,
    )
    return float if float in kinds else int if int in kinds else object


def check_entry(key: str, entry: dict[str, Any]) -> list[Any]:
    """The values of one searched param to validate (bounds or choices); ParamsError if bad."""
    where = f"params.{key}"
    if set(entry) == {"choices"}:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise ParamsError(f"{where}.choices: a non-empty list is allowed, got {choices!r}")
        if any(isinstance(c, dict | list) for c in choices) or len(set(map(repr, choices))) < len(
            choices
        ):
            raise ParamsError(f"{where}.choices: distinct numbers, strings, booleans or null")
        return choices
    if not {"low", "high"} <= set(entry) <= {"low", "high", "log"}:
        raise ParamsError(f"{where}: either {{choices: [...]}} or {{low, high, log}}; got {entry}")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    kind = leaf_type(key)
    if kind is object:
        raise ParamsError(f"{where}: not a number; a range needs one, give choices instead")
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ParamsError(f"{where}: bounds must be numbers, got {bound!r}")
        if kind is int and not isinstance(bound, int):
            raise ParamsError(f"{where}: {key} is an integer; bounds must be too, got {bound!r}")
    if low >= high:
        what = "empty range" if low == high else "the lower bound is above the upper"
        raise ParamsError(f"{where}: {what} (low {low}, high {high}); use set: to fix a value")
    if not isinstance(log, bool) or (log and low <= 0):
        raise ParamsError(f"{where}.log: true needs low > 0 (got log {log!r}, low {low})")
    return [low, high]


def load_space(name: str) -> Space:
    """studies/NAME.yaml, checked against params.yaml's schema: every value a trial may get."""
    if not NAME.match(name):
        raise ParamsError(f"study name {name!r}: lowercase letters, digits, - and _ are allowed")
    path = STUDIES / f"{name}.yaml"
    if not path.is_file():
        found = sorted(p.stem for p in STUDIES.glob("*.yaml"))
        raise ParamsError(f"{path}: file not found; studies here: {', '.join(found) or 'none'}")
    try:
        space = Space.model_validate(P.read_yaml(path) or {})
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise ParamsError(f"{path}: {'; '.join(problems)}") from None
    known = P.Params().flat()
    for key in [*space.params, *space.set]:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see docs/params.md"
            raise ParamsError(f"{path}: {key}: not a param of params.yaml ({hint})")
        if key == "readouts":
            raise ParamsError(f"{path}: readouts: set by the study (readout: {space.readout})")
        if key in space.params and key in space.set:
            raise ParamsError(f"{path}: {key}: both searched (params) and fixed (set)")
    if space.sampler == "grid" and any("choices" not in e for e in space.params.values()):
        raise ParamsError(f"{path}: sampler grid: every param needs choices, not a range")
    base = P.read_yaml(P.PARAMS_FILE)
    fixed = space.set | {"readouts": [space.readout]}
    P.parse(with_values(base, fixed), f"{path}: set")
    for key, entry in space.params.items():
        try:
            values = check_entry(key, entry)
        except ParamsError as exc:
            raise ParamsError(f"{path}: {exc}") from None
        for value in values:
            P.parse(with_values(base, fixed | {key: value}), f"{path}: params.{key} = {value!r}")
    return space


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of params.yaml's tree with dotted keys set, as `dvc exp run -S` sets them."""
    out = json.loads(json.dumps(raw))
    for key, value in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out
