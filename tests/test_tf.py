"""pipeline.tf: TensorFlow's start-up chatter is hidden, but a failed import still says why."""

import sys
from pathlib import Path

import pytest
from helpers import ROOT, clean_env, sh


def test_a_failing_import_shows_what_was_captured_and_the_error(tmp_path: Path) -> None:
    # A stand-in keras that writes to file descriptor 2, as TensorFlow's C++ side does, then fails.
    (tmp_path / "keras.py").write_text(
        "import os\nos.write(2, b'F0000 the real reason\\n')\nraise ImportError('no keras here')\n"
    )
    env = clean_env(PYTHONPATH=f"{tmp_path}:{ROOT}")
    out = sh(sys.executable, "-c", "import pipeline.tf", cwd=tmp_path, check=False, env=env)
    assert out.returncode == 1
    assert "F0000 the real reason" in out.stderr and "ImportError: no keras here" in out.stderr


@pytest.mark.slow  # the quick loop has test_train's stage process, which asserts it quiet
def test_a_working_import_prints_nothing(tmp_path: Path) -> None:
    code = "from pipeline.tf import keras, tf; print(tf.reduce_sum(tf.ones(3)).numpy())"
    out = sh(sys.executable, "-c", code, cwd=tmp_path)
    assert out.stdout.strip() == "3.0" and out.stderr == ""
