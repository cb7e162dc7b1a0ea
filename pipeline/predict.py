"""Classify image files: python -m pipeline.predict FILE... [--model URI] [--json].

The default model is the registry's champion, models:/<registry.name>@champion (rnn-mnist unless
params.yaml says otherwise), found in the project's store from any folder inside the repository.
--model takes any MLflow model URI (models:/rnn-mnist/3, models:/m-...), a local MLflow model
folder, or a trained readout folder of the pipeline (models/state_h, as `dvc pull` brings it).
Reads PNG and JPEG of any size and colour, converted the way the model's dataset was made, and
.npy/.npz arrays and IDX files of 28x28 images (pipeline/images.py, with its size limits). Prints
one line per image: file, class (and its name for Fashion-MNIST), probability. A file it cannot
read gets one `error:` line; the other files are still classified, and the exit code is then 2.
A model's code runs when it loads: its MLmodel file is checked first (check_image_model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from pipeline import params as P
from pipeline import store
from pipeline.images import DATASETS, read_images
from pipeline.io import read_json
from pipeline.packaging import image_model, sequence_index
from pipeline.stage import PREPARED, ConfigError, DataError, run_stage


def load(model: str | None):  # -> mlflow.pyfunc.PyFuncModel
    """The model to use, without ever creating an MLflow store on the way."""
    import mlflow

    if model and (Path(model) / "model.keras").is_file():
        return from_network(Path(model))
    if model and Path(model).is_dir():
        uri = model
    else:
        root = store.project_root()
        uri = store.tracking_uri()
        # never an empty store created, nor tables in an empty mlflow.db
        store.existing_store(uri, ", or pass --model with a local model folder")
        mlflow.set_tracking_uri(uri)
        if model is None:
            params = P.load(root / P.PARAMS_FILE)
            model = f"models:/{params.registry.model_name(params.data.dataset)}@champion"
        uri = model
    store.quiet()
    check_image_model(uri)  # before MLflow runs the model's code
    from pipeline.tf import keras  # noqa: F401  TensorFlow imported quietly, before the model does

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MLflow raises many kinds: not found, no such alias, bad folder
        raise ConfigError(f"--model {uri}: cannot be loaded ({first_line(exc)})") from None


def check_image_model(uri: str) -> None:
    """Refuse a model that is not an image model of pipeline.register, reading its MLmodel file
    alone (YAML, read safely): loading a model runs its code."""
    from mlflow.models import Model

    try:
        mlmodel = Model.load(uri)
    except Exception as exc:  # MLflow raises many kinds: not found, no such alias, bad folder
        raise ConfigError(f"--model {uri}: cannot be loaded ({first_line(exc)})") from None
    pyfunc = mlmodel.flavors.get("python_function") or {}
    if (mlmodel.metadata or {}).get("dataset") not in DATASETS or pyfunc.get(
        "loader_module"
    ) != "mlflow.pyfunc.loaders.code_model":  # models-from-code: never a pickle
        raise ConfigError(f"--model {uri}: not an image model (registered by pipeline.register)")


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def from_network(folder: Path):  # -> mlflow.pyfunc.PyFuncModel
    """A trained readout folder of the pipeline (models/<readout>, as `dvc pull` brings it),
    wrapped as the register stage wraps it, with the pixel order of the project it belongs to."""
    import mlflow

    root = folder.resolve().parents[1]  # <project>/models/<readout>
    meta_file = root / PREPARED / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(
            f"--model {folder}: a trained network needs its project's {meta_file} for the pixel "
            "order: run `dvc pull` (or `dvc repro`) in the project"
        )
    params = P.load(root / P.PARAMS_FILE)
    index = sequence_index(read_json(meta_file)["order"], params.seed)
    network = folder / "model.keras"
    try:  # Keras would blame the copy MLflow loads, in a temp folder
        with zipfile.ZipFile(network) as archive:
            damaged = archive.testzip()  # the first member whose CRC fails, if any
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        damaged = str(exc)
    if damaged:
        raise ConfigError(
            f"--model {folder}: {network} is damaged ({damaged}): restore it with `dvc pull` "
            "or `dvc repro`"
        )
    store.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        # catch_warnings: MLflow's "no input example" is noise for a model made for this call
        with (
            image_model(network, index, params.data.dataset) as parts,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(f"{tmp}/model", **parts)
        try:
            return mlflow.pyfunc.load_model(f"{tmp}/model")  # holds the network in memory
        except Exception as exc:  # Keras raises many kinds for a truncated or foreign file
            raise ConfigError(
                f"--model {folder}: {network} cannot be loaded ({first_line(exc)}): restore it "
                "with `dvc pull` or `dvc repro`"
            ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument(
        "--model", help="an MLflow model URI, a local model folder, or models/<readout>"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    model = load(args.model)
    meta = model.metadata.metadata
    labels, images, failed = [], [], 0
    for path in args.files:
        try:
            found = read_images(path, meta["dataset"])
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        except MemoryError:  # within the limits of pipeline/images.py, on a small machine
            print(f"error: {path}: does not fit in this machine's memory", file=sys.stderr)
            failed += 1
            continue
        labels += [label for label, _ in found]
        images += [image for _, image in found]
    if images:
        out = model.predict(np.stack(images).astype(np.float32))
        for label, cls, probs in zip(labels, out["class"], out["probabilities"], strict=True):
            name, p = meta["classes"][int(cls)], float(probs[cls])
            if args.json:
                print(
                    json.dumps({"file": label, "class": int(cls), "name": name, "probability": p})
                )
            else:
                named = f" {name}" if name != str(cls) else ""
                print(f"{label}: {cls}{named} ({p:.3f})")
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    run_stage(main)
