"""The served model: images [N, 28, 28] or image files [N] in, class probabilities and the class out.

Logged by the register stage with MLflow's models-from-code (pipeline/packaging.py). Stored with
this file inside the model, and all it needs besides numpy, Pillow, Keras and MLflow:
- `network`: the trained .keras model, unchanged, which reads sequences [N, T, F] (safe mode);
- `sequence`: JSON {"index": [T][F] pixel numbers, "dataset": ..., "classes": [...]}: step t,
  feature f of a sequence is pixel index[t][f] of the row-major image, as pipeline/preprocess.py
  made the training data, so `permuted_pixels` needs nothing from the client;
- code/pipeline/: pipeline/images.py, tf.py and the modules they import, which MLflow puts on sys.path,
  so a client loads the model with mlflow.pyfunc or `mlflow models serve` alone.
Input, one of:
- numbers [N, 28, 28] (or one image [28, 28]): pixel values 0-255 or 0-1, ink bright on dark; an
  input whose largest value is above 1 is taken as 0-255;
- image files [N] (or one): PNG or JPEG, as base64 strings (JSON) or bytes, converted by
  pipeline/images.py exactly as `python -m pipeline.predict FILE` converts them (a black-on-white
  drawing is inverted, its digit scaled and centred as MNIST's were).
A bad input raises MlflowException INVALID_PARAMETER_VALUE naming what is wrong: the scoring
server answers 400 with that message. The network runs as one compiled function, without
model.predict's per-call overhead and progress bar.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.images import picture  # the model's own copy, from its code/ folder
from pipeline.stage import DataError

BATCH = 1024  # as evaluate scores the test set, so that both compute the same logits
EXPECTED = (
    "images [N, 28, 28] of numbers, or image files [N] (PNG or JPEG, base64 strings or bytes)"
)


def bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


class ImageClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        # The model's copy of pipeline/tf.py: TensorFlow without its C++ start-up notices (a
        # served model printed "failed call to cuInit: ... CUDA error" on a machine without GPU).
        from pipeline.tf import keras, tf

        spec = json.loads(Path(context.artifacts["sequence"]).read_text())
        self.index = np.asarray(spec["index"], dtype=np.int64)
        self.dataset = spec["dataset"]
        self.network = keras.saving.load_model(context.artifacts["network"], safe_mode=True)
        steps, features = self.index.shape
        signature = [tf.TensorSpec([None, steps, features], tf.float32)]
        # autograph off: nothing to convert, and no source to read if the code file is gone
        self.logits = tf.function(
            lambda x: self.network(x, training=False), signature, autograph=False
        )

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> dict[str, np.ndarray]:  # an ndarray hint: MLflow checks the signature, not the hint
        images = self.images(np.asarray(model_input))
        shape = list(images.shape)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise bad(f"expected {EXPECTED}, got numbers of shape {shape}")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise bad("pixel values must lie in 0-255 (or 0-1)")
        if images.size and images.max() > 1:
            images = images / np.float32(255)
        sequences = images.reshape(len(images), 784)[:, self.index]
        logits = np.concatenate(
            [self.logits(sequences[i : i + BATCH]).numpy() for i in range(0, len(images), BATCH)]
            or [np.zeros((0, 10), np.float32)]
        )
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return {"probabilities": probabilities, "class": logits.argmax(axis=1)}

    def images(self, x: np.ndarray) -> np.ndarray:
        """float32 pixels: numbers as they are, files converted as predict converts them."""
        if x.ndim <= 1 and x.size and all(isinstance(v, (str, bytes)) for v in x.flat):
            return np.stack([self.read(v, f"image {i}") for i, v in enumerate(x.flat)])
        try:
            return x.astype(np.float32)
        except (TypeError, ValueError):  # strings among numbers, ragged lists
            kinds = sorted({type(v).__name__ for v in x.flat})
            raise bad(f"expected {EXPECTED}, got {', '.join(kinds)} {list(x.shape)}") from None

    def read(self, file: str | bytes, name: str) -> np.ndarray:
        if isinstance(file, str):
            try:  # line breaks allowed: `base64` writes them
                file = base64.b64decode("".join(file.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise bad(f"{name}: not base64 ({exc})") from None
        if not file:
            raise bad(f"{name}: empty file")
        try:
            return picture(file, name, self.dataset).astype(np.float32)
        except DataError as exc:
            raise bad(str(exc)) from None


mlflow.models.set_model(ImageClassifier())
