"""Small-sample statistics for the verdicts: t-based intervals, Welch's test, slopes with their df.

Every verdict of the report is a t test, at `ALPHA` = 0.05:

* An estimate over n values (seeds, epochs): mean, sample s.d. (ddof 1), SE = sd / sqrt(n), and
  the interval mean ± t_{1 - (1 - level)/2, n - 1} SE (Student 1908).
* A difference of two means (Welch 1947): d = mean_a - mean_b, SE^2 = v_a + v_b with
  v = sd^2 / n, t = d / SE on the Welch-Satterthwaite degrees of freedom
  df = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1)). A difference whose variance is
  any sum of independent variance estimates v_i, each on df_i degrees of freedom, gets
  df = (sum v_i)^2 / sum(v_i^2 / df_i) (Satterthwaite 1946): `combined_test`.
* A slope of y on x: least squares; the SE from the residuals on n - 2 df (`fit_slope`), or, with
  error bars on y, weighted least squares whose SE is scaled by sqrt(chi^2 / (n - 2)) when the
  scatter exceeds the error bars (Birge ratio), tested on n - 2 df.
* p-values: "less" is P(T <= t), the one-sided p of d < 0; "greater" is P(T >= t); two-sided is
  P(|T| >= |t|). A directional claim (d < 0 predicted) is decided by two one-sided tests at
  ALPHA: supported when p_less < ALPHA, refuted when p_greater < ALPHA, otherwise undecided
  (`TTest.direction`); a claim of agreement ("consistent with a slope of -1") by the two-sided p.

The t distribution comes from `scipy.special` (its `stdtr`, `stdtrit`), imported on first use so
that figure processes, which only read finished analyses, do not load it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

ALPHA = 0.05
LEVEL = 0.95
LESS, GREATER, TWO_SIDED = "less", "greater", "two-sided"

# --------------------------------------------------------------------------------------------
# The t distribution (df = inf is the normal distribution)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (NaN for NaN input or df <= 0)."""
    if not (df > 0) or math.isnan(t):
        return float("nan")
    from scipy import special  # first use only: see the module docstring
    return float(special.ndtr(t) if math.isinf(df) else special.stdtr(df, t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom (NaN for df <= 0)."""
    if not (df > 0) or not 0 < q < 1:
        return float("nan")
    from scipy import special
    return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))


# --------------------------------------------------------------------------------------------
# Estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Mean, sample s.d. and count over values (NaNs, e.g. diverged runs, left out), and the
    t interval of the mean at `level` on df = n - 1 (NaN with fewer than two values)."""

    mean: float
    sd: float
    n: int
    lo: float = float("nan")
    hi: float = float("nan")
    df: float = float("nan")
    level: float = LEVEL

    @classmethod
    def of(cls, values: Sequence[float], level: float = LEVEL) -> "Estimate":
        """`mean_interval(values, level)`."""
        return mean_interval(values, level)

    @property
    def se(self) -> float:
        """sd / sqrt(n); NaN with fewer than two values."""
        return self.sd / math.sqrt(self.n) if self.n > 1 else float("nan")


def finite_values(values: Sequence[float]) -> np.ndarray:
    """The finite values as float64 (None and NaN left out)."""
    return np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """The `Estimate` of the finite `values`: mean, s.d., n and the t interval of the mean."""
    v = finite_values(values)
    nan = float("nan")
    if len(v) == 0:
        return Estimate(nan, nan, 0, level=level)
    mean = float(v.mean())
    if len(v) == 1:
        return Estimate(mean, nan, 1, df=0.0, level=level)
    sd = float(v.std(ddof=1))
    df = float(len(v) - 1)
    half = t_quantile(0.5 + level / 2, df) * sd / math.sqrt(len(v))
    return Estimate(mean, sd, len(v), mean - half, mean + half, df, level)


# --------------------------------------------------------------------------------------------
# t tests


@dataclasses.dataclass(frozen=True)
class TTest:
    """A t test of an estimated difference d (or of a slope minus its null value).

    Attributes:
      diff: the estimate minus its null value, d.
      se: its standard error.
      t: d / se (+-inf for a nonzero d with zero spread; NaN when the SE is unknown).
      df: degrees of freedom of t (inf: normal).
    """

    diff: float
    se: float
    t: float
    df: float

    @property
    def known(self) -> bool:
        """Whether the test can decide anything: t is a number and df > 0."""
        return not math.isnan(self.t) and self.df > 0

    def p(self, alternative: str = TWO_SIDED) -> float:
        """The p-value for the alternative d < 0 ("less"), d > 0 ("greater") or d != 0."""
        if not self.known:
            return float("nan")
        if math.isinf(self.t):
            below = 1.0 if self.t > 0 else 0.0
        else:
            below = t_cdf(self.t, self.df)
        if alternative == LESS:
            return below
        if alternative == GREATER:
            return 1.0 - below
        if alternative == TWO_SIDED:
            return min(1.0, 2.0 * min(below, 1.0 - below))
        raise ValueError(f"alternative must be {LESS!r}, {GREATER!r} or {TWO_SIDED!r}")

    @property
    def p_one_sided(self) -> float:
        """The one-sided p in the direction of the observed sign of t."""
        return min(self.p(LESS), self.p(GREATER)) if self.known else float("nan")

    def direction(self, alpha: float = ALPHA) -> int:
        """-1 if d < 0 at one-sided level alpha, +1 if d > 0 at it, 0 otherwise (or unknown)."""
        if not self.known:
            return 0
        if self.p(LESS) < alpha:
            return -1
        if self.p(GREATER) < alpha:
            return 1
        return 0

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        """The two-sided t interval of d (NaN when unknown)."""
        if not self.known:
            return float("nan"), float("nan")
        half = t_quantile(0.5 + level / 2, self.df) * self.se
        return self.diff - half, self.diff + half


def t_test(diff: float, se: float, df: float) -> TTest:
    """The `TTest` of `diff` with standard error `se` on `df` degrees of freedom."""
    if not (np.isfinite(diff) and np.isfinite(se)):
        return TTest(float(diff), float(se), float("nan"), float(df))
    if se > 0:
        t = diff / se
    else:  # no spread at all: any nonzero difference is certain, a zero one is no evidence
        t = math.copysign(float("inf"), diff) if diff != 0 else 0.0
    return TTest(float(diff), float(se), float(t), float(df))


def satterthwaite_df(components: Sequence[tuple[float, float]]) -> float:
    """(sum v_i)^2 / sum(v_i^2 / df_i) for variance estimates v_i on df_i degrees of freedom.

    Components with v_i = 0 carry no uncertainty and drop out; NaN when any df_i of a nonzero
    component is not positive, or when every v_i is 0.
    """
    total, denominator = 0.0, 0.0
    for variance, df in components:
        if variance == 0:
            continue
        if not (df > 0) or not np.isfinite(variance):
            return float("nan")
        total += variance
        denominator += variance ** 2 / df
    return total ** 2 / denominator if denominator > 0 else float("nan")


def combined_test(diff: float, components: Sequence[tuple[float, float]]) -> TTest:
    """The t test of `diff` whose variance is the sum of independent estimates (v_i, df_i)."""
    if not components or any(not np.isfinite(v) for v, _ in components):
        return t_test(diff, float("nan"), float("nan"))
    se = math.sqrt(sum(v for v, _ in components))
    df = satterthwaite_df(components)
    if se == 0:  # no spread: the sample sizes still say how many values there are
        df = float(sum(d for _, d in components))
    return t_test(diff, se, df)


def welch(a: Sequence[float] | Estimate, b: Sequence[float] | Estimate) -> TTest:
    """Welch's t test of mean(a) - mean(b): values, or their `Estimate`s (NaNs left out).

    With fewer than two values on either side the SE is unknown: t, df and p are NaN.
    """
    a = a if isinstance(a, Estimate) else mean_interval(a)
    b = b if isinstance(b, Estimate) else mean_interval(b)
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return t_test(diff, float("nan"), float("nan"))
    return combined_test(diff, [(a.sd ** 2 / a.n, a.n - 1), (b.sd ** 2 / b.n, b.n - 1)])


# --------------------------------------------------------------------------------------------
# Slopes


@dataclasses.dataclass(frozen=True)
class Slope:
    """A least-squares slope of y on x.

    Attributes:
      slope, intercept: the fitted line y = intercept + slope x.
      se: the slope's standard error.
      df: degrees of freedom of its t statistic (n - 2; inf for two points with error bars).
      n: points fitted.
      lo, hi: the two-sided 95% t interval of the slope.
    """

    slope: float
    intercept: float
    se: float
    df: float
    n: int
    lo: float
    hi: float

    def test(self, null: float = 0.0) -> TTest:
        """The t test of slope - null."""
        return t_test(self.slope - null, self.se, self.df)


def fit_slope(x: Sequence[float], y: Sequence[float], sy: Sequence[float] | None = None,
              level: float = LEVEL) -> Slope | None:
    """The least-squares slope of y on x with its SE, df and t interval.

    Args:
      x, y: the points.
      sy: standard errors of y, or None. With them, each point is weighted by 1 / sy^2 and the
        slope's SE is that of the error bars, scaled up by sqrt(chi^2 / (n - 2)) when the
        points scatter more than their error bars say (never down); df = n - 2, or inf for two
        points (no residual to judge the error bars by). Without them, ordinary least squares
        with the SE from the residuals on n - 2 df (needs three points).
      level: of the interval.

    Returns:
      The `Slope`, or None when it cannot be estimated (too few points, x constant).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if n < 2 or np.ptp(x) == 0 or (sy is None and n < 3):
        return None
    w = np.ones(n) if sy is None else 1.0 / np.asarray(sy, np.float64) ** 2
    xm = np.sum(w * x) / np.sum(w)
    ym = np.sum(w * y) / np.sum(w)
    sxx = np.sum(w * (x - xm) ** 2)
    slope = float(np.sum(w * (x - xm) * (y - ym)) / sxx)
    dof = n - 2
    chi2 = float(np.sum(w * (y - ym - slope * (x - xm)) ** 2) / dof) if dof > 0 else 0.0
    if sy is None:
        se, df = math.sqrt(chi2 / sxx), float(dof)
        if chi2 <= (1e-12 * (1.0 + float(np.max(np.abs(y))))) ** 2:
            # The points lie on a line to rounding: no residual to estimate an error from
            # (e.g. values confined to a lattice); the slope's SE and interval are unknown.
            return Slope(slope, float(ym - slope * xm), float("nan"), df, n, float("nan"),
                         float("nan"))
    else:
        se = math.sqrt(1.0 / sxx) * math.sqrt(max(chi2, 1.0))
        df = float(dof) if dof > 0 else float("inf")
    half = t_quantile(0.5 + level / 2, df) * se
    return Slope(slope, float(ym - slope * xm), float(se), df, n, slope - half, slope + half)


# --------------------------------------------------------------------------------------------
# Numbers as plain text (the report and the figures write numbers alike)


def plain_number(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, positional: 260 (not 2.6e+02), 0.001, 0.0625."""
    if not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if value == 0:
        return "0"
    text = np.format_float_positional(float(value), precision=digits, unique=True,
                                      fractional=False, trim="-")
    return text
