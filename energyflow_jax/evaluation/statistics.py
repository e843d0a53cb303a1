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
