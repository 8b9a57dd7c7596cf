"""The experiment statistics: pure functions of per-user sums, with no store, server or clock.

Metrics are ratios of sums over users (CTR = clicks / shown items), and users, not impressions, are the
randomisation unit: one user's impressions are correlated, so every variance here is the delta-method variance
of a ratio of per-user sums (Deng et al., "Applying the Delta Method in Metric Analytics", 2018). Treating each
impression as independent would understate the variance and inflate the false-positive rate.

The test that may be read at any time is the mixture sequential probability ratio test (mSPRT) with a normal
mixture over the difference (Johari, Pekelis, Walsh, "Always Valid Inference", 2017):

    Lambda_n = sqrt(V / (V + tau^2)) * exp(tau^2 * D^2 / (2 V (V + tau^2)))

with D the observed difference between the arms, V its variance and tau the mixture's standard deviation (the
effect size the test is tuned for: by default the minimum detectable lift). p = min(1, 1 / Lambda) stays valid
however often the report is read and whenever the reader stops; a plain z-test read repeatedly does not
(`make experiment-sim` measures both). The same inequality, solved for D, gives the always-valid interval.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

_N = NormalDist()


@dataclass(frozen=True)
class RatioStats:
    """Sums over the users of one arm for a ratio metric sum(x) / sum(y): x = clicks, y = shown items."""

    n: int          # users
    sx: float
    sy: float
    sxx: float
    syy: float
    sxy: float

    @classmethod
    def of(cls, x, y) -> "RatioStats":
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return cls(len(x), float(x.sum()), float(y.sum()), float(x @ x), float(y @ y), float(x @ y))

    @property
    def ratio(self) -> float:
        return self.sx / self.sy if self.sy else 0.0

    @property
    def variance(self) -> float:
        """Delta-method variance of the ratio (0 below two users)."""
        n = self.n
        if n < 2 or self.sy <= 0:
            return 0.0
        mx, my = self.sx / n, self.sy / n
        vx = (self.sxx - n * mx * mx) / (n - 1)
        vy = (self.syy - n * my * my) / (n - 1)
        cxy = (self.sxy - n * mx * my) / (n - 1)
        r = mx / my
        return max((vx - 2 * r * cxy + r * r * vy) / (n * my * my), 0.0)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        half = _N.inv_cdf(0.5 + level / 2) * math.sqrt(self.variance)
        return self.ratio - half, self.ratio + half


def vectorised_ratio(n, sx, sy, sxx, syy, sxy):
    """RatioStats.ratio and .variance over arrays of sums (the simulator's thousands of runs at once)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx, my = sx / n, sy / n
        vx = (sxx - n * mx * mx) / (n - 1)
        vy = (syy - n * my * my) / (n - 1)
        cxy = (sxy - n * mx * my) / (n - 1)
        r = mx / my
        var = np.maximum((vx - 2 * r * cxy + r * r * vy) / (n * my * my), 0.0)
    ok = (n >= 2) & (sy > 0)
    return np.where(ok, r, 0.0), np.where(ok, var, 0.0)


# ---- the always-valid test -----------------------------------------------------------------------------
def msprt_log_lambda(diff, variance, tau: float):
    """log Lambda of the normal-mixture mSPRT for H0: no difference (arrays or floats)."""
    diff, variance = np.asarray(diff, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 0.5 * np.log(variance / (variance + t2)) + t2 * diff * diff / (2 * variance * (variance + t2))
    return np.where(variance > 0, out, 0.0)


def always_valid_p(diff: float, variance: float, tau: float) -> float:
    return float(min(1.0, math.exp(-float(msprt_log_lambda(diff, variance, tau)))))


def always_valid_halfwidth(variance: float, tau: float, alpha: float) -> float:
    """Half-width of the confidence sequence for the difference: every d with Lambda(D - d) < 1/alpha."""
    if variance <= 0:
        return math.inf
    t2 = tau * tau
    return math.sqrt(2 * variance * (variance + t2) / t2 * (math.log(1 / alpha) + 0.5 * math.log((variance + t2) / variance)))


def z_p(diff: float, variance: float) -> float:
    """The fixed-horizon two-sided z-test p-value: valid only if read once, at a sample size fixed in advance."""
    if variance <= 0:
        return 1.0
    return 2 * (1 - _N.cdf(abs(diff) / math.sqrt(variance)))


def msprt_power(effect: float, variance: float, tau: float, alpha: float) -> float:
    """Probability that a read at variance `variance` (the sample size at which it is read) rejects H0 when the
    true difference is `effect`: |D| / sqrt(V) must exceed the mSPRT's boundary c(V). A report read several times
    before rejects at least this often."""
    if variance <= 0:
        return 0.0
    t2 = tau * tau
    c = math.sqrt((variance + t2) / t2 * (2 * math.log(1 / alpha) + math.log((variance + t2) / variance)))
    shift = effect / math.sqrt(variance)
    return _N.cdf(shift - c) + _N.cdf(-shift - c)


def users_needed(effect: float, variance_now: float, users_now: int, tau: float, alpha: float, power: float,
                 limit: int = 10**9) -> int | None:
    """Users per arm at which a read reaches `power` for `effect`, if variance falls as 1 / users (from what
    has been seen so far). None when even `limit` users would not do."""
    if users_now < 2 or variance_now <= 0 or effect == 0:
        return None
    scale = variance_now * users_now

    def reached(n):
        return msprt_power(effect, scale / n, tau, alpha) >= power

    if not reached(limit):
        return None
    low, high = 1, limit
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if not reached(mid) else (low, mid)
    return low


# ---- one arm against the control -------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    control: float
    treatment: float
    difference: float
    difference_ci: tuple[float, float]       # always valid, at 1 - alpha
    lift: float                              # treatment / control - 1
    lift_ci: tuple[float, float]             # fixed-horizon delta method on the log ratio, 95%
    p_always_valid: float
    p_fixed_horizon: float                   # for reference: valid only for one read at a planned size
    significant: bool                        # p_always_valid <= alpha
    tau: float
    power_at_mde: float                      # a read now, if the true lift were the MDE
    users_needed_per_arm: int | None         # for power at the MDE

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def mixture_tau(control_rate: float, mde: float) -> float:
    """The mixture's scale: the absolute difference the minimum detectable lift means at the control's rate."""
    return max(control_rate * mde, 1e-9)


def compare(control: RatioStats, treatment: RatioStats, alpha: float = 0.05, mde: float = 0.10,
            power: float = 0.80, tau: float | None = None) -> Comparison:
    c, t = control.ratio, treatment.ratio
    variance = control.variance + treatment.variance
    tau = tau if tau is not None else mixture_tau(c, mde)
    diff = t - c
    half = always_valid_halfwidth(variance, tau, alpha)
    if c > 0 and t > 0:
        se_log = math.sqrt(control.variance / c**2 + treatment.variance / t**2)
        z = _N.inv_cdf(0.975)
        lift_ci = (math.exp(math.log(t / c) - z * se_log) - 1, math.exp(math.log(t / c) + z * se_log) - 1)
    else:
        lift_ci = (-math.inf, math.inf)
    p = always_valid_p(diff, variance, tau)
    effect = c * mde
    users = min(control.n, treatment.n)
    return Comparison(c, t, diff, (diff - half, diff + half), t / c - 1 if c else math.inf, lift_ci, p,
                      z_p(diff, variance), p <= alpha, tau, msprt_power(effect, variance, tau, alpha),
                      users_needed(effect, variance, users, tau, alpha, power))


def non_inferior(control: RatioStats, treatment: RatioStats, max_drop: float, alpha: float = 0.05) -> tuple[bool, float]:
    """Whether the treatment's ratio is shown to be at least (1 - max_drop) x the control's: the one-sided
    (1 - alpha) lower bound of treatment / control - 1, by the delta method on the log ratio, must be >= -max_drop.
    -> (passes, that lower bound)."""
    c, t = control.ratio, treatment.ratio
    if c <= 0:
        return True, 0.0  # nothing converts on the control: the canary cannot be worse than nothing
    if t <= 0:
        return False, -1.0
    se_log = math.sqrt(control.variance / c**2 + treatment.variance / t**2)
    lower = math.exp(math.log(t / c) - _N.inv_cdf(1 - alpha) * se_log) - 1
    return lower >= -max_drop, lower


def wilson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (per-position CTR)."""
    if trials <= 0:
        return 0.0, 1.0
    z = _N.inv_cdf(0.5 + level / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))  # rounding never excludes p
