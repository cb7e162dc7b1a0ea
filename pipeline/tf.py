"""TensorFlow and Keras, imported without TensorFlow's C++ start-up chatter.

TensorFlow 2.21 writes oneDNN and CUDA notices ("E0000 ... failed call to cuInit: ... CUDA error")
to file descriptor 2 while it is imported, before absl logging is set up, so no environment
variable silences them; a user reads them as failures. They are captured during the import and
shown only if the import fails. TF_CPP_MIN_LOG_LEVEL=3 quiets what C++ logs later; Python errors
still show. Every module that needs TensorFlow imports it from here: `from pipeline.tf import tf`.

`import tensorflow` also imports all of Keras, whose optional extras import scikit-learn (the
sklearn wrappers), pandas (DataFrame inputs) and matplotlib.pyplot (an image gallery) when they
are installed, as mlxtend installs the first two: about 2 s of CPU in every stage process, a
quarter of the import. None of the three is used through Keras here, so they are held back
during the import (Keras treats them as not installed) and import normally afterwards.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

with tempfile.TemporaryFile() as _captured:
    _stderr = os.dup(2)
    sys.stderr.flush()
    os.dup2(_captured.fileno(), 2)
    _held_back = [m for m in ("sklearn", "pandas", "matplotlib.pyplot") if m not in sys.modules]
    sys.modules.update(dict.fromkeys(_held_back))  # None: `import sklearn` raises ImportError
    try:
        import keras
        import tensorflow as tf
    except BaseException:
        os.dup2(_stderr, 2)
        _captured.seek(0)
        sys.stderr.write(_captured.read().decode(errors="replace"))
        raise
    finally:
        for _name in _held_back:
            del sys.modules[_name]
        os.dup2(_stderr, 2)
        os.close(_stderr)

__all__ = ["keras", "tf"]
