"""Paired statistics shared by the experiments: mean and a 95 % t-interval (no scipy)."""

from __future__ import annotations

import math
import statistics

# two-sided 95 % Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    for k in keys:            # the next tabulated df below: a slightly wider (conservative) interval
        if k > df:
            break
        best = k
    return _T975[best] if df < 120 else 1.960


def mean_ci(values: list[float]) -> dict:
    """{'mean', 'lo', 'hi', 'n', 'excludes_0'}: the 95 % t-interval of the mean."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "excludes_0": False}
    m = statistics.fmean(xs)
    if n == 1:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "excludes_0": False}
    half = t975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "excludes_0": bool(m - half > 0 or m + half < 0)}


def fmt_ci(ci: dict, digits: int = 3, pct: bool = False) -> str:
    if ci["mean"] is None:
        return "—"
    k = 100.0 if pct else 1.0
    unit = " %" if pct else ""
    if ci["lo"] is None:
        return f"{ci['mean'] * k:+.{digits}f}{unit} (n=1)"
    star = " *" if ci["excludes_0"] else ""
    return f"{ci['mean'] * k:+.{digits}f} [{ci['lo'] * k:+.{digits}f}, {ci['hi'] * k:+.{digits}f}]{unit}{star}"
