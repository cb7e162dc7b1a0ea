"""params.yaml validation: the committed file is valid, bad values are refused with the key named."""

import re
import time
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml
from helpers import call_stage, committed_params, deadline, one_error, params_dict

from pipeline import params as P
from pipeline.stage import ParamsError


def test_committed_params_yaml_is_valid_and_matches_the_schema_defaults(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(committed_params())
    params = P.load(tmp_path / "params.yaml")
    assert params == P.Params()  # the file documents the defaults, nothing else
    assert params.readouts == ["state_h", "output_last"]


def test_flat_names_every_leaf_with_its_dotted_path() -> None:
    tree = P.Params().model_dump()
    flat = P.Params().flat()
    for key, value in flat.items():
        node = tree
        for part in key.split("."):
            node = node[part]
        assert node == value and not isinstance(value, dict), key
    assert flat["train.lr"] == 0.001 and flat["readouts"] == ["state_h", "output_last"]
    leaves = sum(len(v) if isinstance(v, dict) else 1 for v in tree.values())
    assert len(flat) == leaves  # nothing left out


@pytest.mark.parametrize(
    ("text", "value"), [("1e-3", 0.001), ("1E3", 1000.0), (".5", 0.5), ("5e-4", 0.0005)]
)
def test_numbers_are_read_as_dvc_reads_them(tmp_path: Path, text: str, value: float) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; DVC reads it as 0.001, and so must the stages."""
    original = committed_params()
    edited = re.sub(r"timeout: \S+", f"timeout: {text}", original)
    assert edited != original
    (tmp_path / "params.yaml").write_text(edited)
    assert parse_yaml(edited, "params.yaml")["data"]["timeout"] == value  # DVC's own parser
    assert P.load(tmp_path / "params.yaml").data.timeout == value


def test_a_misspelled_key_is_named_beside_the_missing_one() -> None:
    raw = params_dict()
    raw["train"]["epoch"] = raw["train"].pop("epochs")
    with pytest.raises(ParamsError) as err:
        P.parse(raw)
    assert "train.epoch: unknown key (did you mean train.epochs?)" in str(err.value)
    assert "train.epochs: missing (the documented default is 20)" in str(err.value)


def test_every_key_must_be_in_the_file() -> None:
    """DVC reruns stages by what params.yaml says, so no value may silently come from code."""
    raw = params_dict()
    del raw["data"]["timeout"], raw["sequence"]
    with pytest.raises(ParamsError, match=r"data\.timeout: missing.*; sequence: missing"):
        P.parse(raw)


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ("\n  lr_schedule:", "\n   lr_schedule:", "line 30 is indented deeper than line 29, "),
        (
            "\n  seed:",  # train.seed, the first of its block
            "\n   seed:",
            "line 29 is indented 2 spaces, but the lines of its block are indented 3 \\(from line 28\\)",
        ),
        ("\n  epochs:", "\nepochs:", "line 35 is indented deeper than line 34, "),
    ],
)
def test_broken_indentation_is_blamed_on_its_own_line(
    tmp_path: Path, old: str, new: str, line: str
) -> None:
    """The parser notices a misindented line only at the next one (and so DVC blames that)."""
    text = committed_params()
    assert old in text
    (tmp_path / "params.yaml").write_text(text.replace(old, new))
    with pytest.raises(ParamsError, match=f"not valid YAML: {line}"):
        P.load(tmp_path / "params.yaml")
    assert P.misindented(text) is None


def test_check_command_names_every_problem_at_once(tmp_path: Path) -> None:
    good = committed_params()
    (tmp_path / "params.yaml").write_text(good)
    ok = call_stage("params", tmp_path)
    assert ok.returncode == 0 and "params.yaml: valid" in ok.stdout, ok.stderr
    (tmp_path / "params.yaml").write_text(
        good.replace("epochs:", "epoch:").replace("seed:", "sede:")
    )
    bad = call_stage("params", tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    for named in (
        "sede: unknown key (did you mean seed?)",
        "seed: missing",
        "train.epoch: unknown",
    ):
        assert named in bad.stderr


@pytest.mark.parametrize(
    ("raw", "named", "allowed"),
    [
        ({"trian": {}}, "trian", "unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
        ({"train": {"lr": 0}}, "train.lr", "greater than 0"),
        ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size", "valid integer"),
        ({"train": {"epochs": True}}, "train.epochs", "valid integer"),
        ({"readouts": []}, "readouts", "at least 1"),
        ({"readouts": ["state_h", "state_h"]}, "readouts", "twice"),
        ({"readouts": ["last"]}, "readouts.0", "'output_last'"),
        ({"model": {"cell": "transformer"}}, "model.cell", "'lstm', 'gru' or 'simple_rnn'"),
        ({"model": {"unit_forget_bias": "yes"}}, "model.unit_forget_bias", "valid boolean"),
        ({"train": {"global_clipnorm": 0}}, "train.global_clipnorm", "greater than 0"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_schedule", "'constant' or 'cosine'"),
        ({"train": {"tbptt_steps": 0}}, "train.tbptt_steps", "greater than or equal to 1"),
        (
            {"train": {"tbptt_steps": 28}, "readouts": ["output_mean"]},
            "train.tbptt_steps",
            "use state_h, output_last or state_c",
        ),
        (
            {"model": {"cell": "gru"}, "readouts": ["state_c"]},
            "readouts",
            "allowed: state_h",
        ),
        ({"sequence": {"order": "diagonal"}}, "sequence.order", "'permuted_pixels'"),
        ({"data": {"val_size": 1.0}}, "data.val_size", "less than 1"),
        ({"data": {"source": "path"}}, "data.path", "required"),
        ({"data": {"source": "s3"}}, "data.source", "'bundled'"),
        ({"data": {"url": "http://example.com/mnist.npz"}}, "data.url", "https://"),
        ({"data": {"sha256": "abc"}}, "data.sha256", "64 lowercase hex"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_bad_values_are_refused_naming_key_and_what_is_allowed(raw, named, allowed) -> None:
    with pytest.raises(ParamsError) as err:
        P.parse(params_dict(raw))
    message = str(err.value)
    assert named in message
    assert allowed in message
    assert "\n" not in message  # one line
    assert "missing" not in message  # every other key is there


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(
        ParamsError, match=r"params\.yaml: expected a mapping of sections, got list"
    ):
        P.parse(["a", "list"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        P.load(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: {lr: [0.1\n")
    with pytest.raises(ParamsError, match="not valid YAML") as err:
        P.load(bad)
    assert "\n" not in str(err.value)


def test_an_empty_file_names_every_missing_section(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(ParamsError, match=r"seed: missing.*; data: missing.*; readouts: missing"):
        P.load(tmp_path / "params.yaml")


def _alias_bomb(levels: int, width: int) -> str:
    """seed: `width`**`levels` values from a few hundred bytes, each level `width` aliases of the
    one below it (the "billion laughs")."""
    lines = ["laughs:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + committed_params().replace("seed: 42", f"seed: *l{levels - 1}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_alias_bomb(9, 9), "more than 1000 values (with YAML aliases expanded)"),  # 9**9, shallow
        (_alias_bomb(30, 2), "nested deeper than 10 levels"),  # 2**30, deep
        (
            committed_params().replace("seed: 42", "seed: " + "[" * 20_000 + "]" * 20_000),
            "brackets nested deeper than 10 levels",
        ),
        ("seed: " + "{a: " * 10_000 + "1" + "}" * 10_000, "brackets nested deeper than 10 levels"),
        ("# padding\n" * 7000, "larger than 64 KiB"),
    ],
    ids=["alias bomb", "deep alias bomb", "20,000 brackets deep", "10,000 braces deep", "70 KB"],
)
def test_hostile_files_end_in_one_line_within_a_second(
    tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "params.yaml").write_text(text)
    started = time.process_time()
    with deadline(20):  # before: minutes and gigabytes, or a 2,986-line RecursionError
        out = call_stage("params", tmp_path)
    seconds = time.process_time() - started
    assert one_error(out).startswith(f"error: params.yaml: {expected}")
    assert seconds < 1.0, f"{seconds:.2f} s of CPU"
