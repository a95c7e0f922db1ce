r"""Continual-learning metrics from the accuracy matrix.

``R[i][j]`` is the accuracy on task ``j``'s test set after training task ``i`` (``j <= i``; entries above the
diagonal are ``None``). With ``N`` tasks (Chaudhry et al. 2018, as C-LoRA and CODA-Prompt report them):

.. math:: A_N = \frac{1}{N}\sum_{j=1}^{N} R_{N,j}, \qquad
          F_N = \frac{1}{N-1}\sum_{j=1}^{N-1} \Big(\max_{j \le i < N} R_{i,j} - R_{N,j}\Big)

(forgetting: how far each earlier task fell from its best accuracy before the last task). ``F_N`` is ``None`` for a
single task. In the class-incremental setting ``R`` is measured with the prediction taken over every class seen so
far, so forgetting includes the bias towards new classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from leanfm.errors import LeanfmError

Matrix = Sequence[Sequence[float | None]]


def _value(matrix: Matrix, i: int, j: int) -> float:
    value = matrix[i][j]
    if value is None:
        raise LeanfmError(f"accuracy matrix has no entry R[{i}][{j}]; accepted: a lower-triangular matrix")
    return float(value)


def average_accuracy(matrix: Matrix) -> float:
    """:math:`A_N`: the mean accuracy over all tasks after the last one."""
    last = len(matrix) - 1
    if last < 0:
        raise LeanfmError("accuracy matrix is empty")
    return sum(_value(matrix, last, j) for j in range(last + 1)) / (last + 1)


def forgetting(matrix: Matrix) -> float | None:
    """:math:`F_N`: mean drop of each earlier task from its best accuracy before the last task (None for one task)."""
    last = len(matrix) - 1
    if last < 1:
        return None
    drops = [max(_value(matrix, i, j) for i in range(j, last)) - _value(matrix, last, j) for j in range(last)]
    return sum(drops) / len(drops)
