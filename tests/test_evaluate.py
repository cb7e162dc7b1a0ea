"""The confusion matrix counts (actual, predicted) pairs the right way round."""

import numpy as np

from pipeline.evaluate import confusion_matrix


def test_confusion_matrix_rows_are_actual_columns_predicted() -> None:
    actual = np.array([0, 0, 3, 9, 9, 9])
    predicted = np.array([0, 5, 3, 9, 9, 1])
    m = confusion_matrix(actual, predicted)
    assert m.shape == (10, 10) and m.sum() == 6
    assert m[0, 0] == 1 and m[0, 5] == 1 and m[3, 3] == 1 and m[9, 9] == 2 and m[9, 1] == 1
    per_class = m.diagonal() / np.maximum(m.sum(axis=1), 1)
    assert per_class[0] == 0.5 and per_class[9] == 2 / 3 and per_class[4] == 0.0
