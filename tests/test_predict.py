"""python -m pipeline.predict with a local model folder: one line per image, one error line per
file it cannot read, exit code 2 then, JSON lines, and never an MLflow store where it runs."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from datafiles import npy_header, png_declaring
from helpers import (
    call_stage,
    deadline,
    log_small_image_model,
    one_error,
    working_in,
    write_params,
)
from PIL import Image

from pipeline import predict
from pipeline.stage import ConfigError


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small untrained image model, logged as register logs it, then downloaded to a folder."""
    with working_in(tmp_path_factory.mktemp("store")) as root:
        uri = log_small_image_model(root, np.zeros((1, 28, 28), np.float32))
        yield Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(root / "download")))


def test_unreadable_files_get_one_error_line_each_and_the_rest_is_classified(
    model_folder: Path, tmp_path: Path, bundled_data: dict[str, np.ndarray]
) -> None:
    digits = bundled_data["x_test"][:3]
    np.save(tmp_path / "three.npy", digits)
    Image.fromarray(255 - digits[0]).resize((90, 90)).save(tmp_path / "drawn.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    (tmp_path / "folder").mkdir()
    files = ["three.npy", "corrupt.png", "drawn.png", "empty.png", "dot.png", "folder"]
    out = call_stage("predict", tmp_path, *files, "--json", "--model", str(model_folder))
    assert out.returncode == 2, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == [
        "three.npy[0]",
        "three.npy[1]",
        "three.npy[2]",
        "drawn.png",
    ]
    for row in rows:
        assert row["name"] == str(row["class"]) and 0 < row["probability"] <= 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    for name, why in [
        ("corrupt.png", "corrupt"),
        ("empty.png", "empty file"),
        ("dot.png", "1x1 px"),
        ("folder", "is a directory"),
    ]:
        assert any(name in e and why in e for e in errors), (name, out.stderr)
    assert len(errors) == 4 and "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_without_a_store_it_says_so_and_creates_none(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((28, 28), np.uint8))
    out = call_stage("predict", tmp_path, "one.npy")
    assert out.returncode == 2
    assert "error: no MLflow store at" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy"]


def test_a_pulled_readout_folder_predicts_as_its_registered_model(
    model_folder: Path, bundled_data: dict[str, np.ndarray]
) -> None:
    """models/state_h as `dvc pull` brings it: the network, with the project's pixel order.
    (tests/test_team.py runs the command itself on a pulled clone.)"""
    root = model_folder.parent  # the project the fixture trained in (download/ is its folder)
    write_params(root)
    (root / "data/prepared").mkdir(parents=True, exist_ok=True)
    (root / "data/prepared/meta.json").write_text(json.dumps({"order": "rows"}))
    images = bundled_data["x_test"][:20].astype(np.float32)
    pulled = predict.from_network(root / "models/state_h").predict(images)
    registered = mlflow.pyfunc.load_model(str(model_folder)).predict(images)
    assert np.array_equal(pulled["class"], registered["class"])
    np.testing.assert_allclose(pulled["probabilities"], registered["probabilities"], rtol=1e-6)


def test_a_readout_folder_without_its_project_data_says_what_to_pull(
    model_folder: Path, tmp_path: Path
) -> None:
    network = tmp_path / "models/state_h"
    network.mkdir(parents=True)
    (network / "model.keras").write_bytes(
        (model_folder.parent / "models/state_h/model.keras").read_bytes()
    )
    with pytest.raises(ConfigError, match=r"meta.json for the pixel order: run `dvc pull`"):
        predict.from_network(network)


def test_hostile_files_get_one_line_each_and_the_others_their_answers(
    model_folder: Path, tmp_path: Path
) -> None:
    """A FIFO, an endless device, an array header declaring a billion images, a PNG declaring
    13,000 x 13,000 px: refused in one line each, in seconds, and the good file is classified."""
    np.save(tmp_path / "good.npy", np.zeros((2, 28, 28), np.uint8))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "billion.npy").write_bytes(npy_header((10**9, 28, 28)) + bytes(784))
    (tmp_path / "huge.png").write_bytes(png_declaring(13_000, 13_000))
    files = ["fifo", "zero", "billion.npy", "huge.png", "good.npy"]
    with deadline(60), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call_stage("predict", tmp_path, *files, "--json", "--model", str(model_folder))
    assert out.returncode == 2
    assert [json.loads(line)["file"] for line in out.stdout.splitlines()] == [
        "good.npy[0]",
        "good.npy[1]",
    ]
    assert out.stderr.splitlines() == [
        "error: fifo: not a regular file (a pipe, socket or device); not read",
        "error: zero: not a regular file (a pipe, socket or device); not read",
        "error: billion.npy: header declares shape (1000000000, 28, 28) of uint8 = "
        "747,680.7 MiB, but 784 bytes follow it",
        "error: huge.png: image is 13000x13000 px, more than the limit of 25 megapixels; "
        "scale it down first",
    ]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_an_empty_mlflow_db_is_left_empty(tmp_path: Path) -> None:
    write_params(tmp_path)
    (tmp_path / "mlflow.db").touch()
    np.save(tmp_path / "one.npy", np.zeros((28, 28), np.uint8))
    error = one_error(call_stage("predict", tmp_path, "one.npy"))
    assert error.startswith(f"error: no MLflow store at {tmp_path / 'mlflow.db'} (an empty file)")
    assert (tmp_path / "mlflow.db").stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "one.npy", "params.yaml"]


def test_a_folder_that_is_not_an_image_model_is_refused_before_its_code_runs(
    model_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    mlmodel = folder / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("  dataset: mnist\n", ""))
    canary = tmp_path / "code ran"
    with (folder / "image_model.py").open("a") as f:
        f.write(f"\nopen({str(canary)!r}, 'w').close()\n")
    np.save(tmp_path / "one.npy", np.zeros((28, 28), np.uint8))
    error = one_error(call_stage("predict", tmp_path, "one.npy", "--model", str(folder)))
    assert error == f"error: --model {folder}: not an image model (registered by pipeline.register)"
    assert not canary.exists()


def test_a_truncated_network_is_named_in_one_line(model_folder: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/meta.json").write_text(json.dumps({"order": "rows"}))
    network = tmp_path / "models/state_h/model.keras"
    network.parent.mkdir(parents=True)
    whole = (model_folder.parent / "models/state_h/model.keras").read_bytes()
    network.write_bytes(whole[: len(whole) // 2])
    np.save(tmp_path / "one.npy", np.zeros((28, 28), np.uint8))
    out = call_stage("predict", tmp_path, "one.npy", "--model", "models/state_h")
    assert one_error(out) == (
        "error: --model models/state_h: models/state_h/model.keras is damaged (File is not a zip "
        "file): restore it with `dvc pull` or `dvc repro`"
    )
