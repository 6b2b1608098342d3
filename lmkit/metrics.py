"""Classification scores from true and predicted label indices (plain Python, no dependencies)."""

from __future__ import annotations

from collections.abc import Sequence


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> list[list[int]]:
    """matrix[t][p]: examples of true class t predicted as p."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, predicted):
        matrix[t][p] += 1
    return matrix


def per_class(matrix: list[list[int]]) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class (0 where undefined, as sklearn does)."""
    scores = []
    for k in range(len(matrix)):
        true_pos = matrix[k][k]
        predicted = sum(row[k] for row in matrix)
        support = sum(matrix[k])
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    return scores


def accuracy_and_macro_f1(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> tuple[float, float]:
    matrix = confusion_matrix(truth, predicted, n_labels)
    accuracy = sum(matrix[k][k] for k in range(n_labels)) / max(1, len(truth))
    return accuracy, sum(s["f1"] for s in per_class(matrix)) / n_labels
