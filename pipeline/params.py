"""params.yaml: the typed schema every stage validates before it does any work.

An unknown key, a wrong type or an out-of-range value stops the stage with one message that names
the key and what is allowed (ParamsError), so a typo never costs a download or a training run.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")

Dataset = Literal["mnist", "fashion_mnist"]
Source = Literal["auto", "download", "path", "bundled"]
Order = Literal["rows", "columns", "pixels", "permuted_pixels"]
Cell = Literal["lstm", "gru", "simple_rnn"]
Readout = Literal["state_h", "output_last", "state_c", "output_mean"]

# Which readouts each recurrent layer can give: only the LSTM has a cell state c.
CELL_READOUTS: dict[str, tuple[str, ...]] = {
    "lstm": ("state_h", "output_last", "state_c", "output_mean"),
    "gru": ("state_h", "output_last", "output_mean"),
    "simple_rnn": ("state_h", "output_last", "output_mean"),
}


class ParamsError(ValueError):
    """params.yaml is missing, malformed or out of range; the message says what and where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(_Section):
    dataset: Dataset = "mnist"
    source: Source = "auto"
    url: str | None = None  # None: the canonical copy Keras downloads (see pipeline/fetch.py)
    sha256: str | dict[str, str] | None = None  # None: the pinned hash(es) of that copy
    path: str | None = None  # for source: path, a .npz or a folder of the four IDX .gz files
    timeout: float = Field(30.0, gt=0, le=3600)  # seconds without an answer before giving up
    val_size: float = Field(0.1, gt=0, lt=1)  # fraction of train held out, stratified

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.source == "path" and not self.path:
            raise ValueError("data.path is required when data.source is 'path'")
        url = urllib.parse.urlsplit(self.url or "https://")
        local = url.scheme == "http" and url.hostname == "127.0.0.1"
        if url.scheme != "https" and not local:
            raise ValueError("data.url must be an https:// URL (or http://127.0.0.1 for tests)")
        sha = self.sha256
        hashes = [sha] if isinstance(sha, str) else list((sha or {}).values())
        for h in hashes:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"data.sha256 must be 64 lowercase hex digits, got {h!r}")
        return self


class SequenceParams(_Section):
    order: Order = "rows"


class ModelParams(_Section):
    cell: Cell = "lstm"
    input_units: int = Field(128, ge=1, le=4096)
    units: int = Field(128, ge=1, le=4096)
    unit_forget_bias: bool = True  # LSTM: forget-gate bias starts at 1 (the seed's forget_bias)


class TrainParams(_Section):
    readouts: list[Readout] = Field(
        default_factory=lambda: ["state_h", "output_last"], min_length=1
    )
    lr: float = Field(0.001, gt=0, le=1)
    batch_size: int = Field(128, ge=1, le=65536)
    epochs: int = Field(20, ge=1, le=10000)
    log_every_n_batches: int = Field(1, ge=1)
    global_clipnorm: float | None = Field(None, gt=0)  # clip the norm of all gradients together
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 at the end
    tbptt_steps: int | None = Field(None, ge=1)  # stateful training in chunks of this many steps

    @model_validator(mode="after")
    def _unique(self) -> TrainParams:
        if len(set(self.readouts)) != len(self.readouts):
            raise ValueError("train.readouts lists a readout twice")
        return self


class Params(_Section):
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataParams = DataParams()
    sequence: SequenceParams = SequenceParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()

    @model_validator(mode="after")
    def _readouts_fit_cell(self) -> Params:
        for readout in self.train.readouts:
            self.check_readout(readout, key="train.readouts")
        if self.train.tbptt_steps is not None and "output_mean" in self.train.readouts:
            raise ValueError(
                "train.tbptt_steps: not with the readout 'output_mean' (a chunk sees only its "
                "own steps); use state_h, output_last or state_c"
            )
        return self

    def check_readout(self, readout: str, key: str = "readout") -> None:
        """Refuse a readout that model.cell lacks (a GRU has no cell state c)."""
        allowed = CELL_READOUTS[self.model.cell]
        if readout not in allowed:
            raise ParamsError(
                f"{key}: {readout!r} is not available for model.cell {self.model.cell!r}; "
                f"allowed: {', '.join(allowed)}"
            )

    def flat(self) -> dict[str, Any]:
        """Every parameter with a dotted key (train.lr), as logged to MLflow."""
        return flatten(self.model_dump())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "params.yaml"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see the params reference in README.md)"
    if kind == "literal_error":
        return f"{key}: {error['input']!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{key}: {msg} (got {error.get('input')!r})"


def parse(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source}: {problems}") from None


def load(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError with one clear message."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse(raw, str(path))
