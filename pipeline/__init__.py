"""Recurrent networks on MNIST read as sequences: a DVC pipeline tracked in MLflow."""
