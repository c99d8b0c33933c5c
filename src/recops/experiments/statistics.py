"""Pure functions of counts for A/B rollout gates.

Everything here takes aggregated counts (successes/trials, sums/sums of
squares) rather than raw events, so an operator can evaluate a gate from the
counters it already keeps, at any look, without re-reading logs.

* :func:`two_proportion_test` – fixed-horizon z-test for a difference of rates.
* :func:`msprt_p_value`, :func:`sequential_decision`, :func:`msprt_confidence_interval`
  – mixture SPRT (Johari, Pekelis & Walsh 2017, "Always valid inference"),
  safe to evaluate after every batch of traffic.
* :func:`normal_msprt_p_value`, :func:`normal_msprt_interval` – the same mSPRT for any
  asymptotically normal estimate (a difference of per-user means).
* :func:`sample_ratio_mismatch` – anytime-valid test of arm sizes against the split (Lindon &
  Malek 2022, "Anytime-valid inference for multinomial count data"), safe at every look.
* :func:`ratio_metric_lift` – Welch comparison of per-user means (e.g. GMV/user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

from scipy import special, stats

Decision = Literal["treatment_better", "treatment_worse", "continue"]

# Mixing variance of the mSPRT's normal prior on the absolute rate difference.
# tau = 0.01 suits click-through-like rates of a few percent, where the lifts
# worth detecting are around one percentage point; the test stays valid for any
# tau, the choice only moves detection time (Johari et al. 2017, section 4).
DEFAULT_TAU_SQUARED = 1e-4

# Below this many trials per arm the normal approximation behind the plug-in
# variance is poor for rates of a few percent, so the gate refuses to decide.
DEFAULT_MIN_SAMPLES = 1000

# Concentration of the Dirichlet mixture behind the sequential SRM test, centred on the configured
# split. Small: the mixture spreads over gross mismatches (what assignment and logging bugs look
# like), which it then flags with a few hundred users; a 1 % skew needs far more users than a step
# has. The test stays valid for any value (Lindon & Malek 2022, section 3).
DEFAULT_SRM_CONCENTRATION = 100.0


@dataclass(frozen=True)
class LiftResult:
    """Fixed-horizon comparison of two rates (treatment minus control)."""

    control_rate: float
    treatment_rate: float
    difference: float
    relative_lift: float  # treatment_rate / control_rate - 1; NaN when control_rate == 0
    ci_low: float  # unpooled Wald interval for ``difference``
    ci_high: float
    z: float  # pooled-SE z statistic for H0: equal rates
    p_value: float  # two-sided
    alpha: float

    @property
    def significant(self) -> bool:
        """Whether the two-sided test rejects equal rates at ``alpha``."""
        return self.p_value < self.alpha


@dataclass(frozen=True)
class SrmResult:
    """Sequential check of observed arm sizes against the configured split.

    ``log_bayes_factor`` is the evidence for *some* other split over the configured one; the
    p-value is ``min(1, 1 / Bayes factor)``, valid however often it is looked at.
    """

    log_bayes_factor: float
    p_value: float
    mismatch: bool
    expected_counts: tuple[float, ...]


@dataclass(frozen=True)
class MeanLiftResult:
    """Welch comparison of two per-user means (treatment minus control)."""

    control_mean: float
    treatment_mean: float
    difference: float
    relative_lift: float  # NaN when control_mean == 0
    ci_low: float
    ci_high: float
    t: float
    df: float  # Welch–Satterthwaite degrees of freedom
    p_value: float  # two-sided
    alpha: float

    @property
    def significant(self) -> bool:
        """Whether the two-sided Welch test rejects equal means at ``alpha``."""
        return self.p_value < self.alpha


# --------------------------------------------------------------------------- validation


def _check_count(value: int, name: str) -> int:
    # bool is an Integral too, but passing True as a count is always a bug.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer count, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


def _check_arm(successes: int, trials: int, arm: str) -> tuple[int, int]:
    s = _check_count(successes, f"{arm}_successes")
    n = _check_count(trials, f"{arm}_trials")
    if s > n:
        raise ValueError(f"{arm}_successes ({s}) must not exceed {arm}_trials ({n})")
    return s, n


def _check_size(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _relative(treatment: float, control: float) -> float:
    return treatment / control - 1.0 if control != 0 else math.nan


# --------------------------------------------------------------------------- fixed horizon


def two_proportion_test(
    control_successes: int,
    control_trials: int,
    treatment_successes: int,
    treatment_trials: int,
    alpha: float = 0.05,
) -> LiftResult:
    """Two-sided z-test for a difference of two proportions, with a Wald interval.

    The test statistic uses the pooled standard error (the variance under H0:
    equal rates); the ``1 - alpha`` confidence interval for the difference is
    the unpooled Wald interval, because away from H0 the rates differ and
    pooling would misstate the spread. The two can therefore disagree right at
    the boundary. Only valid for a single, pre-planned look: use
    :func:`sequential_decision` when the gate is checked repeatedly.
    """
    cs, cn = _check_arm(control_successes, control_trials, "control")
    ts, tn = _check_arm(treatment_successes, treatment_trials, "treatment")
    alpha = _check_alpha(alpha)
    if cn == 0:
        raise ValueError("control_trials must be positive")
    if tn == 0:
        raise ValueError("treatment_trials must be positive")

    pc, pt = cs / cn, ts / tn
    diff = pt - pc
    pooled = (cs + ts) / (cn + tn)
    se_pooled = math.sqrt(pooled * (1.0 - pooled) * (1.0 / cn + 1.0 / tn))
    # Both arms all-success or all-failure: no variation, so no evidence either way.
    z = diff / se_pooled if se_pooled > 0 else 0.0
    p_value = float(math.erfc(abs(z) / math.sqrt(2.0)))

    se_unpooled = math.sqrt(pc * (1.0 - pc) / cn + pt * (1.0 - pt) / tn)
    half = float(special.ndtri(1.0 - alpha / 2.0)) * se_unpooled
    return LiftResult(
        control_rate=pc,
        treatment_rate=pt,
        difference=diff,
        relative_lift=_relative(pt, pc),
        ci_low=diff - half,
        ci_high=diff + half,
        z=z,
        p_value=p_value,
        alpha=alpha,
    )


# --------------------------------------------------------------------------- sequential (mSPRT)


def _log_mixture_lr(diff: float, variance: float, tau_squared: float) -> float:
    """log Λ for an estimate ``diff ~ N(θ, variance)``, H0: θ = 0, mixing θ ~ N(0, τ²).

    Λ = sqrt(V / (V + τ²)) · exp(τ² d² / (2 V (V + τ²)))  (Johari et al. 2017, eq. for normal data).
    """
    return 0.5 * math.log(variance / (variance + tau_squared)) + (
        tau_squared * diff * diff / (2.0 * variance * (variance + tau_squared))
    )


def msprt_p_value(
    control_successes: int,
    control_trials: int,
    treatment_successes: int,
    treatment_trials: int,
    tau_squared: float = DEFAULT_TAU_SQUARED,
    previous_p_value: float = 1.0,
) -> float:
    """Always-valid p-value of the mixture SPRT for H0: equal rates, at the current look.

    The difference of the observed rates is treated as ``N(θ, V)`` and the
    likelihood ratio against θ = 0 is mixed over ``θ ~ N(0, tau_squared)``;
    ``p = min(previous_p_value, 1 / Λ)``. Under H0 Λ is a (approximate)
    martingale, so by Ville's inequality P(p ever ≤ α) ≤ α however often the
    counts are looked at. ``V`` is the pooled, under-H0 variance
    ``p̄(1 - p̄)(1/n_c + 1/n_t)``, matching the test statistic of
    :func:`two_proportion_test`.

    Pass the value returned at the previous look as ``previous_p_value`` to get
    the running minimum (the p-value proper is non-increasing); leave it at 1
    to get the evidence of the current counts alone. An arm with no trials
    yet gives no evidence (returns ``previous_p_value``).
    """
    cs, cn = _check_arm(control_successes, control_trials, "control")
    ts, tn = _check_arm(treatment_successes, treatment_trials, "treatment")
    tau_squared = _check_positive(tau_squared, "tau_squared")
    if (
        isinstance(previous_p_value, bool)
        or not isinstance(previous_p_value, Real)
        or not (0.0 <= previous_p_value <= 1.0)
    ):
        raise ValueError(f"previous_p_value must be in [0, 1], got {previous_p_value!r}")
    if cn == 0 or tn == 0:
        return float(previous_p_value)
    pooled = (cs + ts) / (cn + tn)
    variance = pooled * (1.0 - pooled) * (1.0 / cn + 1.0 / tn)
    if variance == 0.0:
        # Every trial in both arms had the same outcome: the rates are identical.
        return float(previous_p_value)
    log_lr = _log_mixture_lr(ts / tn - cs / cn, variance, tau_squared)
    # exp(-log_lr) can overflow for strongly negative log_lr; the p-value caps at 1 anyway.
    p = 1.0 if log_lr <= 0 else math.exp(-log_lr)
    return float(min(previous_p_value, p))


def sequential_decision(
    control_successes: int,
    control_trials: int,
    treatment_successes: int,
    treatment_trials: int,
    alpha: float = 0.05,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    tau_squared: float = DEFAULT_TAU_SQUARED,
) -> Decision:
    """Gate decision at the current look of a continuously monitored experiment.

    Returns ``"continue"`` while either arm has fewer than ``min_samples``
    trials, or while the always-valid p-value (:func:`msprt_p_value`) is above
    ``alpha``; otherwise the sign of the observed difference picks
    ``"treatment_better"`` or ``"treatment_worse"``. Because a non-continue
    answer at any look needs Λ ≥ 1/alpha at that look, the chance that an A/A
    experiment ever gets a non-continue answer is at most ``alpha`` however
    many looks are taken (skipping looks below ``min_samples`` only shrinks
    that event). Stop the experiment at the first non-continue answer.
    """
    cs, cn = _check_arm(control_successes, control_trials, "control")
    ts, tn = _check_arm(treatment_successes, treatment_trials, "treatment")
    alpha = _check_alpha(alpha)
    min_samples = _check_count(min_samples, "min_samples")
    if cn < min_samples or tn < min_samples:
        return "continue"
    p = msprt_p_value(cs, cn, ts, tn, tau_squared=tau_squared)
    if p > alpha:
        return "continue"
    diff = ts / tn - cs / cn
    # p ≤ alpha < 1 implies a non-zero difference, so the sign is always defined here.
    return "treatment_better" if diff > 0 else "treatment_worse"


def msprt_confidence_interval(
    control_successes: int,
    control_trials: int,
    treatment_successes: int,
    treatment_trials: int,
    alpha: float = 0.05,
    tau_squared: float = DEFAULT_TAU_SQUARED,
    previous_interval: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Always-valid ``1 - alpha`` confidence interval for treatment rate minus control rate.

    Inverts the mixture SPRT for every H0: θ = θ0 (Johari et al. 2017): θ0 is
    kept while Λ(θ0) < 1/alpha, which gives

        d ± sqrt( 2 V (V + τ²) / τ² · (log(1/alpha) + ½ log((V + τ²) / V)) )

    with ``V`` the *unpooled* variance of the difference (away from θ0 = 0 the
    rates differ, so pooling would be wrong). The interval covers θ at every
    look simultaneously with probability ≥ 1 - alpha; pass the previous look's
    interval as ``previous_interval`` to intersect with it (the running
    intersection is still valid and never widens). Clipped to [-1, 1], the
    range of a difference of rates; when ``V`` is 0 (an arm empty, or every
    arm all-0 or all-1) the current look carries no spread information and
    contributes [-1, 1]. Because the decision uses the pooled variance, the
    interval and :func:`sequential_decision` can disagree at the boundary.
    """
    cs, cn = _check_arm(control_successes, control_trials, "control")
    ts, tn = _check_arm(treatment_successes, treatment_trials, "treatment")
    alpha = _check_alpha(alpha)
    tau_squared = _check_positive(tau_squared, "tau_squared")
    low, high = -1.0, 1.0
    if cn > 0 and tn > 0:
        pc, pt = cs / cn, ts / tn
        variance = pc * (1.0 - pc) / cn + pt * (1.0 - pt) / tn
        if variance > 0:
            diff = pt - pc
            total = variance + tau_squared
            half = math.sqrt(
                2.0 * variance * total / tau_squared * (math.log(1.0 / alpha) + 0.5 * math.log(total / variance))
            )
            low, high = max(low, diff - half), min(high, diff + half)
    if previous_interval is not None:
        prev_low, prev_high = previous_interval
        if prev_low > prev_high:
            raise ValueError(f"previous_interval must have low <= high, got {previous_interval!r}")
        low, high = max(low, float(prev_low)), min(high, float(prev_high))
        # An empty intersection means the model assumptions failed somewhere; collapse to a point rather than invert.
        if low > high:
            low = high = (low + high) / 2.0
    return low, high


def normal_msprt_p_value(difference: float, variance: float, tau_squared: float) -> float:
    """Always-valid p-value ``min(1, 1/Λ)`` for H0: θ = 0 from an estimate ``difference ~ N(θ, variance)``.

    The same mixture SPRT as :func:`msprt_p_value`, for any asymptotically normal
    estimate (e.g. a difference of per-user means with a Welch variance) instead of
    a difference of proportions. ``tau_squared`` is in the squared units of
    ``difference``. A zero variance carries no spread information: p = 1.
    """
    _check_finite(difference, "difference")
    if isinstance(variance, bool) or not isinstance(variance, Real) or not math.isfinite(variance) or variance < 0:
        raise ValueError(f"variance must be a non-negative finite number, got {variance!r}")
    tau_squared = _check_positive(tau_squared, "tau_squared")
    if variance == 0:
        return 1.0
    log_lr = _log_mixture_lr(float(difference), float(variance), tau_squared)
    return 1.0 if log_lr <= 0 else math.exp(-log_lr)


def normal_msprt_interval(
    difference: float, variance: float, alpha: float, tau_squared: float
) -> tuple[float, float]:
    """Always-valid ``1 - alpha`` interval for θ from ``difference ~ N(θ, variance)``.

    The inversion used by :func:`msprt_confidence_interval`, without the clipping
    to [-1, 1] (a difference of means is unbounded). A zero variance gives the
    whole real line: the look carries no spread information.
    """
    _check_finite(difference, "difference")
    if isinstance(variance, bool) or not isinstance(variance, Real) or not math.isfinite(variance) or variance < 0:
        raise ValueError(f"variance must be a non-negative finite number, got {variance!r}")
    alpha = _check_alpha(alpha)
    tau_squared = _check_positive(tau_squared, "tau_squared")
    if variance == 0:
        return -math.inf, math.inf
    total = variance + tau_squared
    half = math.sqrt(2.0 * variance * total / tau_squared * (math.log(1.0 / alpha) + 0.5 * math.log(total / variance)))
    return float(difference) - half, float(difference) + half


# --------------------------------------------------------------------------- sample ratio mismatch


def sample_ratio_mismatch(
    observed_counts: Sequence[float],
    expected_weights: Sequence[float],
    alpha: float = 0.001,
    *,
    concentration: float = DEFAULT_SRM_CONCENTRATION,
) -> SrmResult:
    """Anytime-valid test of observed arm sizes against the configured traffic split.

    The Bayes factor of a Dirichlet-multinomial mixture (mean: the configured split, total
    ``concentration``) against the configured multinomial is a test martingale under the null
    (Lindon & Malek 2022), so the gate may look after every scrape: the chance that it *ever*
    reports a mismatch on a correct split is at most ``alpha``. A chi-square test at every look
    would not keep that promise. ``expected_weights`` are normalised to sum to 1. Counts may be
    fractional (see :func:`recops.experiments.gates.decide_sample_ratio`: users counted once per
    router). The default ``alpha`` is strict because a mismatch blocks the rollout. Arms with
    weight 0 and no traffic are dropped; traffic in an arm with weight 0 is an infinite mismatch
    (p = 0). No traffic at all is no evidence: p = 1.
    """
    alpha = _check_alpha(alpha)
    if len(observed_counts) != len(expected_weights):
        raise ValueError(
            f"observed_counts and expected_weights must have the same length, "
            f"got {len(observed_counts)} and {len(expected_weights)}"
        )
    if len(observed_counts) < 2:
        raise ValueError(f"observed_counts needs at least two arms, got {len(observed_counts)}")
    counts = [_check_size(c, f"observed_counts[{i}]") for i, c in enumerate(observed_counts)]
    weights = [_check_size(w, f"expected_weights[{i}]") for i, w in enumerate(expected_weights)]
    concentration = _check_positive(concentration, "concentration")
    weight_total = sum(weights)
    if weight_total <= 0:
        raise ValueError("expected_weights must not all be zero")

    total = sum(counts)
    expected = tuple(total * w / weight_total for w in weights)
    if total == 0:
        return SrmResult(log_bayes_factor=0.0, p_value=1.0, mismatch=False, expected_counts=expected)
    if any(c > 0 and w == 0 for c, w in zip(counts, weights, strict=True)):
        return SrmResult(log_bayes_factor=math.inf, p_value=0.0, mismatch=True, expected_counts=expected)
    cells = [(c, w / weight_total) for c, w in zip(counts, weights, strict=True) if w > 0]
    if len(cells) < 2:
        return SrmResult(log_bayes_factor=0.0, p_value=1.0, mismatch=False, expected_counts=expected)
    n = sum(c for c, _ in cells)
    # log BF = log Γ(K) − log Γ(K + n) + Σ [log Γ(K·θ + x) − log Γ(K·θ)] − Σ x·log θ
    log_bf = float(
        special.gammaln(concentration)
        - special.gammaln(concentration + n)
        + sum(special.gammaln(concentration * theta + c) - special.gammaln(concentration * theta) for c, theta in cells)
        - sum(c * math.log(theta) for c, theta in cells)
    )
    p_value = min(1.0, math.exp(-log_bf)) if log_bf > -700 else 1.0
    return SrmResult(log_bayes_factor=log_bf, p_value=p_value, mismatch=p_value <= alpha, expected_counts=expected)


# --------------------------------------------------------------------------- per-user means


def _mean_and_variance(values_sum: float, values_sumsq: float, n: int, arm: str) -> tuple[float, float]:
    for name, value in ((f"{arm}_values_sum", values_sum), (f"{arm}_values_sumsq", values_sumsq)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if values_sumsq < 0:
        raise ValueError(f"{arm}_values_sumsq must be non-negative, got {values_sumsq!r}")
    mean = values_sum / n
    # Sum of squares from a one-pass accumulator loses precision; tolerate tiny negatives, reject real ones
    # (by Cauchy–Schwarz sumsq >= sum² / n for any real data).
    centred = values_sumsq - values_sum * mean
    if centred < -1e-9 * max(1.0, values_sumsq):
        raise ValueError(f"{arm}_values_sumsq ({values_sumsq!r}) is below {arm}_values_sum² / {arm}_n: not real data")
    return mean, max(centred, 0.0) / (n - 1)


def ratio_metric_lift(
    control_values_sum: float,
    control_values_sumsq: float,
    control_n: int,
    treatment_values_sum: float,
    treatment_values_sumsq: float,
    treatment_n: int,
    alpha: float = 0.05,
) -> MeanLiftResult:
    """Welch t-test and interval for the difference of per-user means (e.g. GMV per user).

    Takes per-arm sums, sums of squares and user counts, so the unit of
    analysis is the user (the randomisation unit) and no delta method is
    needed. Variances are the unbiased sample variances; the degrees of
    freedom are Welch–Satterthwaite. Each arm needs at least two users.
    """
    cn = _check_count(control_n, "control_n")
    tn = _check_count(treatment_n, "treatment_n")
    alpha = _check_alpha(alpha)
    if cn < 2:
        raise ValueError(f"control_n must be at least 2, got {cn}")
    if tn < 2:
        raise ValueError(f"treatment_n must be at least 2, got {tn}")
    mc, vc = _mean_and_variance(control_values_sum, control_values_sumsq, cn, "control")
    mt, vt = _mean_and_variance(treatment_values_sum, treatment_values_sumsq, tn, "treatment")
    diff = mt - mc
    qc, qt = vc / cn, vt / tn
    se = math.sqrt(qc + qt)
    if se == 0:
        # Constant values in both arms: the difference is known exactly.
        df = float(cn + tn - 2)
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return MeanLiftResult(mc, mt, diff, _relative(mt, mc), diff, diff, t, df, 1.0 if diff == 0 else 0.0, alpha)
    df = (qc + qt) ** 2 / (qc * qc / (cn - 1) + qt * qt / (tn - 1))
    t = diff / se
    p_value = float(2.0 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    return MeanLiftResult(
        control_mean=mc,
        treatment_mean=mt,
        difference=diff,
        relative_lift=_relative(mt, mc),
        ci_low=diff - half,
        ci_high=diff + half,
        t=t,
        df=df,
        p_value=p_value,
        alpha=alpha,
    )
