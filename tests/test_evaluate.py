"""The confusion matrix counts (actual, predicted) pairs the right way round; accuracy per class."""

import numpy as np

from pipeline.evaluate import confusion_matrix, per_class_accuracy


def test_confusion_matrix_rows_are_actual_columns_predicted() -> None:
    actual = np.array([0, 0, 3, 9, 9, 9])
    predicted = np.array([0, 5, 3, 9, 9, 1])
    m = confusion_matrix(actual, predicted)
    assert m.shape == (10, 10) and m.sum() == 6
    assert m[0, 0] == 1 and m[0, 5] == 1 and m[3, 3] == 1 and m[9, 9] == 2 and m[9, 1] == 1


def test_per_class_accuracy_is_the_share_of_each_true_class_predicted_right() -> None:
    matrix = np.zeros((10, 10), int)
    matrix[0, 0], matrix[0, 5] = 1, 1  # class 0: 1 of 2 right
    matrix[9, 9], matrix[9, 1] = 2, 1  # class 9: 2 of 3
    matrix[4, 7] = 3  # class 4: 0 of 3
    matrix[2, 2] = 5  # class 2: all 5; classes absent from the test set score 0, not NaN
    expected = [0.5, 0, 1, 0, 0, 0, 0, 0, 0, 2 / 3]
    np.testing.assert_allclose(per_class_accuracy(matrix), expected)
