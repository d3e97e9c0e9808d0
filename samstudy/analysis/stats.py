"""Student t intervals with SciPy's t distribution: quantiles, intervals of means, Welch's interval.

Intervals are written from their summaries (mean, std, n) with ``scipy.stats.t.ppf`` rather than
through ``scipy.stats.ttest_*``: those warn and give NaN on samples that do not vary (identical
seeds, a metric that stays 0), where the interval is simply the point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _t() -> Any:
    # scipy.stats takes about a second to import: only the report and the analysis API pay it,
    # not `samstudy export` or a plain `import samstudy.analysis`.
    from scipy import stats

    return stats.t


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (NaN if df is not > 0)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), not {p}")
    return float(_t().ppf(p, df)) if df > 0 else math.nan


def ci_half_width(
    std: np.ndarray | float, n: np.ndarray | float, level: float = 0.95
) -> np.ndarray | float:
    """Half-width of the Student t interval of a mean: t_{(1+level)/2, n-1} * std / sqrt(n).

    Elementwise over arrays (a float for scalars); NaN where n < 2 or std is NaN.
    """
    n = np.asarray(n, dtype=float)
    df = np.where(n >= 2, n - 1, np.nan)
    root_n = np.sqrt(np.where(n > 0, n, np.nan))
    half = _t().ppf(0.5 + level / 2.0, df) * np.asarray(std, dtype=float) / root_n
    return float(half) if half.ndim == 0 else half


def welch_interval(
    mean_a: float,
    std_a: float,
    n_a: int,
    mean_b: float,
    std_b: float,
    n_b: int,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Welch's interval for mean_a - mean_b: (difference, low, high); NaN bounds if n < 2.

    Degrees of freedom by Welch-Satterthwaite, as ``scipy.stats.ttest_ind(equal_var=False)``.
    """
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2 or math.isnan(std_a) or math.isnan(std_b):
        return diff, math.nan, math.nan
    va, vb = std_a * std_a / n_a, std_b * std_b / n_b
    se = math.sqrt(va + vb)
    if se == 0.0:  # both groups constant: the difference is known exactly
        return diff, diff, diff
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return diff, diff - half, diff + half
