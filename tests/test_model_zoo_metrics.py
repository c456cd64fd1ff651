"""Metrics on hand-computed examples; the module must stay importable without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from model_zoo.metrics import (
    compute_confusion_matrix,
    compute_metrics,
    format_metrics_table,
    summarise_confusion_matrix,
)
from monitor.manifest import EvaluationMetrics


def test_confusion_matrix_counts_rows_true_columns_predicted() -> None:
    matrix = compute_confusion_matrix([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2], 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_metrics_match_hand_computation() -> None:
    # true:      A A A A B B C C C C
    # predicted: A A A B B A C C B C
    true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 0, 0, 1, 1, 0, 2, 2, 1, 2]
    metrics = compute_metrics(true, predicted, ["A", "B", "C"])
    assert isinstance(metrics, EvaluationMetrics)
    assert metrics.confusion_matrix == [[3, 1, 0], [1, 1, 0], [0, 1, 3]]
    assert metrics.accuracy == pytest.approx(7 / 10)
    a, b, c = (metrics.per_class[name] for name in "ABC")
    # A: tp 3, predicted 4, support 4.
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((0.75, 0.75, 0.75, 4))
    # B: tp 1, predicted 3, support 2 -> P 1/3, R 1/2, F1 = 2PR/(P+R) = 0.4.
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((1 / 3, 0.5, 0.4, 2))
    # C: tp 3, predicted 3, support 4 -> P 1, R 0.75, F1 6/7.
    assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((1.0, 0.75, 6 / 7, 4))
    assert metrics.macro_f1 == pytest.approx((0.75 + 0.4 + 6 / 7) / 3)


def test_class_never_predicted_has_zero_precision_and_f1() -> None:
    metrics = compute_metrics([0, 0, 1, 1], [0, 0, 0, 0], ["CEX", "PG"])
    pg = metrics.per_class["PG"]
    assert (pg.precision, pg.recall, pg.f1, pg.support) == (0.0, 0.0, 0.0, 2)
    cex = metrics.per_class["CEX"]
    assert cex.precision == pytest.approx(0.5)
    assert cex.recall == 1.0
    assert cex.f1 == pytest.approx(2 / 3)
    assert metrics.macro_f1 == pytest.approx(1 / 3)
    assert metrics.accuracy == 0.5


def test_class_absent_from_truth_and_predictions_is_left_out_of_macro_f1() -> None:
    metrics = compute_metrics([0, 1, 1], [0, 1, 1], ["CEX", "PG", "bubble"])
    assert metrics.per_class["bubble"].support == 0
    assert metrics.per_class["bubble"].f1 == 0.0
    assert metrics.macro_f1 == 1.0


def test_predicted_but_absent_class_counts_as_zero_f1_in_macro() -> None:
    metrics = compute_metrics([0, 0], [0, 1], ["CEX", "PG"])
    assert metrics.per_class["PG"].f1 == 0.0
    assert metrics.per_class["CEX"].f1 == pytest.approx(2 / 3)
    assert metrics.macro_f1 == pytest.approx(1 / 3)


def test_empty_input_gives_zeros_not_an_error() -> None:
    metrics = compute_metrics([], [], ["CEX", "PG"])
    assert metrics.accuracy == 0.0
    assert metrics.macro_f1 == 0.0
    assert metrics.confusion_matrix == [[0, 0], [0, 0]]


def test_summary_of_matrix_equals_summary_of_labels() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(0, 4, 200)
    predicted = np.where(rng.random(200) < 0.7, true, rng.integers(0, 4, 200))
    classes = ["a", "b", "c", "d"]
    from_labels = compute_metrics(true, predicted, classes)
    from_matrix = summarise_confusion_matrix(np.array(from_labels.confusion_matrix), classes)
    assert from_labels == from_matrix
    assert from_labels.accuracy == pytest.approx(float((true == predicted).mean()))


@pytest.mark.parametrize(
    ("true", "predicted", "message"),
    [([0, 1], [0], "2 true labels but 1 predictions"), ([0, 2], [0, 1], r"\[0, 1\]")],
)
def test_bad_labels_raise_with_the_reason(
    true: list[int], predicted: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compute_confusion_matrix(true, predicted, 2)


def test_table_lists_every_class_and_the_totals() -> None:
    table = format_metrics_table(compute_metrics([0, 1, 1], [0, 1, 0], ["CEX", "PG"]))
    lines = table.splitlines()
    assert lines[1].split() == ["CEX", "0.5000", "1.0000", "0.6667", "1"]
    assert lines[2].split() == ["PG", "1.0000", "0.5000", "0.6667", "2"]
    assert lines[3].split() == ["accuracy", "0.6667", "3"]


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, model_zoo.metrics; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_expected_calibration_error_matches_hand_computation() -> None:
    from model_zoo.metrics import expected_calibration_error

    # Top probabilities 0.95, 0.95 (bin 14, one right: accuracy 0.5, confidence 0.95),
    # 0.6 (bin 8, right: |1 - 0.6| = 0.4) and 0.5 (bin 7, wrong: |0 - 0.5| = 0.5).
    probabilities = np.array([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.5, 0.5]])
    labels = [0, 0, 0, 1]
    expected = 2 / 4 * 0.45 + 1 / 4 * 0.4 + 1 / 4 * 0.5
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    # One bin pools everything: |accuracy 2/4 - mean confidence 0.75|.
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(0.25)


def test_expected_calibration_error_is_zero_when_confidence_is_accuracy() -> None:
    from model_zoo.metrics import expected_calibration_error

    confident_and_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(confident_and_right, [0, 1]) == 0.0
    # 0.8 confident, right 4 times in 5: calibrated.
    probabilities = np.tile([0.8, 0.2], (5, 1))
    assert expected_calibration_error(probabilities, [0, 0, 0, 0, 1]) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros((0, 2)), []) == 0.0
    with pytest.raises(ValueError, match="one row"):
        expected_calibration_error(probabilities, [0, 1])
