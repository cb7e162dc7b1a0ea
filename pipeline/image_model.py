"""The served model: images [N, 28, 28] in, class probabilities and the class out.

Logged by the register stage with MLflow's models-from-code: this file is stored inside the model
and is all the code the model needs (numpy, Keras, MLflow); it imports nothing from this project,
so a client loads it with mlflow.pyfunc or `mlflow models serve` alone. Its artifacts:
- `network`: the trained .keras model, unchanged, which reads sequences [N, T, F] (safe mode);
- `sequence`: JSON {"index": [T][F] pixel numbers, "dataset": ..., "classes": [...]}: step t,
  feature f of a sequence is pixel index[t][f] of the row-major image, as pipeline/preprocess.py
  made the training data, so `permuted_pixels` needs nothing from the client.
Pixel values are 0-255 (uint8 sent as float32) or 0-1: an input whose largest value is above 1
is taken as 0-255. The network runs as one compiled function, without model.predict's per-call
overhead and progress bar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

BATCH = 1024  # as evaluate scores the test set, so that both compute the same logits


class ImageClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ notices
        import keras
        import tensorflow as tf

        spec = json.loads(Path(context.artifacts["sequence"]).read_text())
        self.index = np.asarray(spec["index"], dtype=np.int64)
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
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"expected images of shape [N, 28, 28], got {list(images.shape)}")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError("pixel values must lie in 0-255 (or 0-1)")
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


mlflow.models.set_model(ImageClassifier())
