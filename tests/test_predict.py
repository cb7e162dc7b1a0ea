"""python -m pipeline.predict with a local model folder: one line per image, one error line per
file it cannot read, exit code 2 then, JSON lines, and never an MLflow store where it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from helpers import run_stage
from PIL import Image

from pipeline import register, tracking
from pipeline.model import build_model
from pipeline.preprocess import sequence_index


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small untrained image model, logged as register logs it, then downloaded to a folder."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(root)
        tracking.configure()
        keras.utils.set_random_seed(0)
        (root / "models/state_h").mkdir(parents=True)
        build_model(28, 28, "gru", "state_h", 6, 5).save(root / "models/state_h/model.keras")
        with mlflow.start_run() as run:
            pass
        example = np.zeros((1, 28, 28), np.float32)
        uri = register.log_image_model(
            "state_h", run.info.run_id, sequence_index("rows", 0), "mnist", example
        )
        folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(root / "download")))
        yield folder
    mlflow.set_tracking_uri(None)


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
    out = run_stage("predict", tmp_path, *files, "--json", "--model", str(model_folder))
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
    out = run_stage("predict", tmp_path, "one.npy")
    assert out.returncode == 2
    assert "error: no MLflow store at" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy"]
