"""Recurrent networks on MNIST read as sequences: a DVC pipeline tracked in MLflow."""

import os

# Quiet TensorFlow's C++ start-up chatter (oneDNN notices, CPU feature lines); errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
