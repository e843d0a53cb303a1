"""Success-rate statistics: Wilson score intervals and success pooled over evaluations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate
    at 0 or n successes, which matters for small evaluation budgets.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, no round-off
    return (low, high)


def pooled_success(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success pooled over several evaluations (each with n_episodes, n_successes), Wilson CI."""
    n = sum(int(r["n_episodes"]) for r in results)
    k = sum(int(r["n_successes"]) for r in results)
    if n == 0:
        raise ValueError("pooled_success needs at least one episode")
    return {"success_rate": k / n, "ci95": list(wilson_interval(k, n)), "n_episodes": n, "n_successes": k}


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                        n_resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over paired samples (seeds) and its percentile-bootstrap CI.

    The per-pair differences are resampled (scipy.stats.bootstrap), so pairs stay
    together; with every difference equal the interval is that value.
    """
    import numpy as np
    from scipy import stats

    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1 or len(diff) < 1:
        raise ValueError("paired_bootstrap_ci needs two equal-length 1-D samples")
    mean = float(diff.mean())
    if len(diff) < 2 or np.ptp(diff) == 0:
        return {"mean": mean, "low": mean, "high": mean}
    res = stats.bootstrap((diff,), np.mean, confidence_level=level, n_resamples=n_resamples,
                          method="percentile", rng=np.random.default_rng(seed))
    return {"mean": mean, "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high)}
