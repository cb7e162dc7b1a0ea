"""params.yaml: the typed schema every stage validates before it does any work.

An unknown key, a missing key, a wrong type or an out-of-range value stops the stage with one
message that names the key and what is allowed (ParamsError), so a typo never costs a download or a
training run. The file is read with the YAML parser DVC uses (ruamel.yaml, YAML 1.2), so that the
stages and DVC see the same values (`1e-3` is a number to both). Every key must be in the file:
DVC reruns stages by what params.yaml says, so no value may come from a default in code.

Check the file alone, naming every problem at once: python -m pipeline.params
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.stage import ParamsError, run_stage

PARAMS_FILE = Path("params.yaml")
# params.yaml holds ~2 KB and ~30 values, 3 levels deep. The limits stop a hostile file in well
# under a second: a YAML alias bomb (aliases nest copies: a 1 KB file can mean 10**9 values) or
# nesting so deep that the parser runs out of stack.
MAX_FILE_BYTES = 64 * 1024
MAX_VALUES = 1000  # counted with every alias expanded
MAX_DEPTH = 10

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
    unit_forget_bias: bool = True  # LSTM: forget-gate bias starts at 1 (the post's forget_bias)


class TrainParams(_Section):
    # What training draws (initial weights, batch shuffling); None: the top-level seed. The data
    # (split, pixel permutation) stays with `seed`, so replicates are paired on the same images.
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    lr: float = Field(0.001, gt=0, le=1)
    batch_size: int = Field(128, ge=1, le=65536)
    epochs: int = Field(20, ge=1, le=10000)
    log_every_n_batches: int = Field(1, ge=1)
    global_clipnorm: float | None = Field(None, gt=0)  # clip the norm of all gradients together
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 at the end
    tbptt_steps: int | None = Field(None, ge=1)  # stateful training in chunks of this many steps


class RegistryParams(_Section):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
    )  # None: rnn-<dataset>
    min_improvement: float = Field(0.0, ge=0, le=1)  # test accuracy a challenger must gain
    alpha: float = Field(0.05, gt=0, le=1)  # its gain must be real: McNemar p <= alpha

    def model_name(self, dataset: str) -> str:
        """The registered model: one per dataset, so models of two datasets never compete."""
        return self.name or f"rnn-{dataset.replace('_', '-')}"


class Params(_Section):
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataParams = DataParams()
    sequence: SequenceParams = SequenceParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    # One train + evaluate stage per readout. Top level, not under train: the train stage depends
    # on the whole `train` section, and adding a readout must not retrain the others.
    readouts: list[Readout] = Field(
        default_factory=lambda: ["state_h", "output_last"], min_length=1
    )
    registry: RegistryParams = RegistryParams()

    @model_validator(mode="after")
    def _readouts_fit_cell(self) -> Params:
        if len(set(self.readouts)) != len(self.readouts):
            raise ValueError("readouts lists a readout twice")
        for readout in self.readouts:
            self.check_readout(readout, key="readouts")
        if self.train.tbptt_steps is not None and "output_mean" in self.readouts:
            raise ValueError(
                "train.tbptt_steps: not with the readout 'output_mean' (a chunk sees only its "
                "own steps); use state_h, output_last or state_c"
            )
        return self

    @property
    def train_seed(self) -> int:
        """The seed of what training draws: train.seed, or the top-level seed when that is null."""
        return self.seed if self.train.seed is None else self.train.seed

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
    loc = tuple(str(p) for p in error["loc"])
    key, kind, msg = ".".join(loc) or "params.yaml", error["type"], error["msg"]
    if kind == "extra_forbidden":
        section: type[BaseModel] = Params
        for part in loc[:-1]:
            section = section.model_fields[part].annotation  # type: ignore[assignment]
        close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1)
        hint = f"did you mean {'.'.join((*loc[:-1], close[0]))}?" if close else "see docs/params.md"
        return f"{key}: unknown key ({hint})"
    if kind == "literal_error":
        return f"{key}: {error['input']!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{key}: {msg} (got {error.get('input')!r})"


def missing_keys(raw: dict[str, Any], section: type[BaseModel] = Params) -> list[str]:
    """The dotted keys of the schema that `raw` lacks (a whole missing section counts once)."""
    missing = []
    for name, field in section.model_fields.items():
        value, sub = raw.get(name), field.annotation
        if name not in raw:
            missing.append(name)
        elif isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            missing += [f"{name}.{key}" for key in missing_keys(value, sub)]
    return missing


def parse(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params.yaml: every key present, none unknown, every value allowed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    check_size(raw, source)
    problems = []
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
    defaults = Params().model_dump()
    for key in missing_keys(raw):
        default = defaults
        for part in key.split("."):
            default = default[part]
        problems.append(f"{key}: missing (the documented default is {default!r})")
    if problems:
        raise ParamsError(f"{source}: {'; '.join(problems)}")
    return params


def check_size(raw: Any, source: str) -> None:
    """Refuse a tree of more than MAX_VALUES values or MAX_DEPTH levels, walking no further:
    validating or printing an alias bomb would take minutes and gigabytes."""
    stack, count = [(raw, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ParamsError(
                f"{source}: more than {MAX_VALUES} values (with YAML aliases expanded); "
                "a params file holds a few dozen"
            )
        if depth > MAX_DEPTH:
            raise ParamsError(f"{source}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack += [(child, depth + 1) for item in node.items() for child in item]
        elif isinstance(node, list | tuple):
            stack += [(child, depth + 1) for child in node]


def flow_depth(text: str) -> int:
    """How deep [ and { nest, counted anywhere, even in quotes and comments (no params file
    nests them ten deep there either)."""
    depth = deepest = 0
    for char in re.sub(r"[^][{}]", "", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def load(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError with one clear message."""
    return parse(read_yaml(path), str(path))


def read_yaml(path: Path) -> Any:
    """A small YAML file as DVC reads it, refused in one ParamsError line if it is not one."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    if len(data) > MAX_FILE_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; not a params file")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc})") from None
    if flow_depth(text) > MAX_DEPTH:  # the parser takes seconds on [[[[...]]]] a few KB deep
        raise ParamsError(f"{path}: brackets nested deeper than {MAX_DEPTH} levels")
    try:
        raw = YAML(typ="safe").load(text)  # exactly how DVC reads params.yaml
    except YAMLError as exc:
        where = misindented(text) or ""
        raise ParamsError(f"{path}: not valid YAML: {where}{' '.join(str(exc).split())}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ParamsError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    return raw


def misindented(text: str) -> str | None:
    """Where indentation breaks the block structure, naming both lines involved.

    The YAML parser notices a wrongly indented line only at the next one, and blames that.
    """
    blocks = [(0, 0)]  # (indentation, the line that set it) of the blocks open here
    opens, previous = False, 0
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].rstrip()
        if not content.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent > blocks[-1][0]:
            if not opens:
                return (
                    f"line {number} is indented deeper than line {previous}, which opens no block; "
                )
            blocks.append((indent, number))
        popped = blocks[-1]
        while indent < blocks[-1][0]:
            popped = blocks.pop()
        if indent != blocks[-1][0]:  # a dedent that lands between two open blocks
            return (
                f"line {number} is indented {indent} spaces, but the lines of its block are "
                f"indented {popped[0]} (from line {popped[1]}); "
            )
        opens, previous = content.endswith(":"), number
    return None


def main() -> None:
    params = load()
    print(
        f"{PARAMS_FILE}: valid, {len(params.flat())} params; readouts {', '.join(params.readouts)}"
    )


if __name__ == "__main__":
    run_stage(main)
