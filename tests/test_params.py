"""params.yaml validation: the committed file is valid, bad values are refused with the key named."""

from pathlib import Path

import pytest

from pipeline import params as P

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_valid_and_matches_the_schema_defaults() -> None:
    params = P.load(ROOT / "params.yaml")
    assert params == P.Params()  # the file documents the defaults, nothing else
    assert params.train.readouts == ["state_h", "output_last"]


def test_flat_uses_dotted_keys_for_every_param() -> None:
    flat = P.Params().flat()
    assert flat["train.lr"] == 0.001
    assert flat["model.cell"] == "lstm"
    assert flat["seed"] == 42
    assert len(flat) == 21


@pytest.mark.parametrize(
    ("raw", "named", "allowed"),
    [
        ({"trian": {}}, "trian", "unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
        ({"train": {"lr": 0}}, "train.lr", "greater than 0"),
        ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size", "valid integer"),
        ({"train": {"epochs": True}}, "train.epochs", "valid integer"),
        ({"train": {"readouts": []}}, "train.readouts", "at least 1"),
        ({"train": {"readouts": ["state_h", "state_h"]}}, "train.readouts", "twice"),
        ({"train": {"readouts": ["last"]}}, "train.readouts.0", "'output_last'"),
        ({"model": {"cell": "transformer"}}, "model.cell", "'lstm', 'gru' or 'simple_rnn'"),
        ({"model": {"unit_forget_bias": "yes"}}, "model.unit_forget_bias", "valid boolean"),
        ({"train": {"global_clipnorm": 0}}, "train.global_clipnorm", "greater than 0"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_schedule", "'constant' or 'cosine'"),
        ({"train": {"tbptt_steps": 0}}, "train.tbptt_steps", "greater than or equal to 1"),
        (
            {"train": {"tbptt_steps": 28, "readouts": ["output_mean"]}},
            "train.tbptt_steps",
            "use state_h, output_last or state_c",
        ),
        (
            {"model": {"cell": "gru"}, "train": {"readouts": ["state_c"]}},
            "train.readouts",
            "allowed: state_h",
        ),
        ({"sequence": {"order": "diagonal"}}, "sequence.order", "'permuted_pixels'"),
        ({"data": {"val_size": 1.0}}, "data.val_size", "less than 1"),
        ({"data": {"source": "path"}}, "data.path", "required"),
        ({"data": {"source": "s3"}}, "data.source", "'bundled'"),
        ({"data": {"url": "http://example.com/mnist.npz"}}, "data.url", "https://"),
        ({"data": {"sha256": "abc"}}, "data.sha256", "64 lowercase hex"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        (["a", "list"], "params.yaml", "mapping"),
    ],
)
def test_bad_values_are_refused_naming_key_and_what_is_allowed(raw, named, allowed) -> None:
    with pytest.raises(P.ParamsError) as err:
        P.parse(raw)
    message = str(err.value)
    assert named in message
    assert allowed in message
    assert "\n" not in message  # one line


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(P.ParamsError, match="not found"):
        P.load(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: {lr: [0.1\n")
    with pytest.raises(P.ParamsError, match="not valid YAML") as err:
        P.load(bad)
    assert "\n" not in str(err.value)


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("")
    assert P.load(tmp_path / "params.yaml") == P.Params()
