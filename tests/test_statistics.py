"""A/B gate statistics: fixed-horizon test, always-valid mSPRT, SRM and Welch, checked against scipy and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from recops.experiments.statistics import (
    msprt_confidence_interval,
    msprt_p_value,
    ratio_metric_lift,
    sample_ratio_mismatch,
    sequential_decision,
    two_proportion_test,
)

# --------------------------------------------------------------------------- two_proportion_test


def test_two_proportion_test_matches_hand_computation_and_scipy_norm():
    result = two_proportion_test(100, 2000, 130, 2000)
    pc, pt = 0.05, 0.065
    pooled = 230 / 4000
    z = (pt - pc) / math.sqrt(pooled * (1 - pooled) * (2 / 2000))
    half = stats.norm.ppf(0.975) * math.sqrt(pc * (1 - pc) / 2000 + pt * (1 - pt) / 2000)
    assert result.control_rate == pytest.approx(pc)
    assert result.treatment_rate == pytest.approx(pt)
    assert result.difference == pytest.approx(0.015)
    assert result.relative_lift == pytest.approx(0.3)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert (result.ci_low, result.ci_high) == pytest.approx((0.015 - half, 0.015 + half))
    assert result.significant == (result.p_value < 0.05)


def test_two_proportion_test_edge_cases():
    assert math.isnan(two_proportion_test(0, 100, 5, 100).relative_lift)
    same = two_proportion_test(0, 100, 0, 50)  # no variation anywhere: no evidence
    assert (same.z, same.p_value, same.difference) == (0.0, 1.0, 0.0)
    worse = two_proportion_test(130, 2000, 100, 2000)
    assert worse.z < 0 and worse.difference < 0


def test_wald_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    pc, pt, n, draws = 0.10, 0.12, 2000, 2000
    cs, ts = rng.binomial(n, pc, draws), rng.binomial(n, pt, draws)
    covered = 0
    for c, t in zip(cs, ts, strict=True):
        r = two_proportion_test(int(c), n, int(t), n)
        covered += r.ci_low <= pt - pc <= r.ci_high
    # Binomial SE of the coverage at 2000 draws is ~0.005; allow ~3 SE.
    assert abs(covered / draws - 0.95) < 0.015


# --------------------------------------------------------------------------- sequential: mSPRT vs naive peeking

LOOKS, BATCH, RUNS = 20, 500, 2000  # each arm gains BATCH trials per look: 500 … 10 000 per arm


def _cumulative_counts(rng, runs, rate_c, rate_t):
    control = np.cumsum(rng.binomial(BATCH, rate_c, (runs, LOOKS)), axis=1)
    treatment = np.cumsum(rng.binomial(BATCH, rate_t, (runs, LOOKS)), axis=1)
    return control, treatment, BATCH * np.arange(1, LOOKS + 1)


def _first_decisions(control, treatment, trials, decide):
    """Per run, the first non-"continue" answer over the looks (an experiment stops there)."""
    out = []
    for c_row, t_row in zip(control, treatment, strict=True):
        decision = "continue"
        for c, t, n in zip(c_row, t_row, trials, strict=True):
            decision = decide(int(c), int(n), int(t), int(n))
            if decision != "continue":
                break
        out.append(decision)
    return np.array(out)


def _naive(c, n_c, t, n_t):
    r = two_proportion_test(c, n_c, t, n_t, alpha=0.05)
    if not r.significant:
        return "continue"
    return "treatment_better" if r.difference > 0 else "treatment_worse"


def test_msprt_keeps_false_promotion_below_alpha_under_repeated_looks_while_naive_peeking_does_not():
    control, treatment, trials = _cumulative_counts(np.random.default_rng(2024), RUNS, 0.05, 0.05)
    msprt = _first_decisions(
        control, treatment, trials, lambda c, nc, t, nt: sequential_decision(c, nc, t, nt, alpha=0.05, min_samples=500)
    )
    naive = _first_decisions(control, treatment, trials, _naive)

    msprt_promoted = float(np.mean(msprt == "treatment_better"))
    naive_promoted = float(np.mean(naive == "treatment_better"))
    # The guarantee: an A/A experiment promoted at any of 20 looks at most alpha of the time
    # (measured ~0.006; even counting "worse" calls, any decision at all ~0.013).
    assert msprt_promoted <= 0.05
    assert float(np.mean(msprt != "continue")) <= 0.05
    # The contrast: checking a fixed-horizon z-test at every look promotes far more often (measured ~0.11,
    # ~0.23 for any decision) although each single look is a valid 5% test.
    assert naive_promoted > 0.05
    assert float(np.mean(naive != "continue")) > 0.15


def test_msprt_detects_a_real_lift_in_most_runs():
    control, treatment, trials = _cumulative_counts(np.random.default_rng(99), 400, 0.05, 0.065)
    decisions = _first_decisions(
        control, treatment, trials, lambda c, nc, t, nt: sequential_decision(c, nc, t, nt, alpha=0.05, min_samples=500)
    )
    assert float(np.mean(decisions == "treatment_better")) >= 0.9
    assert not np.any(decisions == "treatment_worse")


def test_sequential_decision_waits_for_min_samples_and_reads_the_sign():
    # Overwhelming evidence, but below min_samples in one arm: still continue.
    assert sequential_decision(50, 999, 200, 5000, min_samples=1000) == "continue"
    assert sequential_decision(50, 1000, 200, 1000, min_samples=1000) == "treatment_better"
    assert sequential_decision(200, 1000, 50, 1000, min_samples=1000) == "treatment_worse"
    assert sequential_decision(50, 1000, 52, 1000, min_samples=1000) == "continue"


def test_msprt_p_value_is_the_inverse_mixture_likelihood_ratio_and_a_running_minimum():
    cs, cn, ts, tn, tau2 = 500, 10_000, 580, 10_000, 1e-4
    pooled = (cs + ts) / (cn + tn)
    v = pooled * (1 - pooled) * (1 / cn + 1 / tn)
    d = ts / tn - cs / cn
    lam = math.sqrt(v / (v + tau2)) * math.exp(tau2 * d * d / (2 * v * (v + tau2)))
    p = msprt_p_value(cs, cn, ts, tn, tau_squared=tau2)
    assert p == pytest.approx(min(1.0, 1 / lam))
    assert msprt_p_value(cs, cn, ts, tn, tau_squared=tau2, previous_p_value=p / 2) == pytest.approx(p / 2)
    assert msprt_p_value(500, 10_000, 500, 10_000) == 1.0
    assert msprt_p_value(0, 0, 3, 10) == 1.0  # an empty arm is no evidence
    # Always-valid p is more conservative than the fixed-horizon p on the same counts.
    assert p > two_proportion_test(cs, cn, ts, tn).p_value


def test_msprt_confidence_interval_matches_inversion_and_covers_at_every_look():
    # The boundary of the interval is where the mixture LR for H0: θ = θ0 equals 1/alpha.
    cs, cn, ts, tn, tau2, alpha = 500, 10_000, 580, 10_000, 1e-4, 0.05
    low, high = msprt_confidence_interval(cs, cn, ts, tn, alpha=alpha, tau_squared=tau2)
    pc, pt = cs / cn, ts / tn
    v = pc * (1 - pc) / cn + pt * (1 - pt) / tn
    for bound in (low, high):
        gap = (pt - pc) - bound
        log_lr = 0.5 * math.log(v / (v + tau2)) + tau2 * gap * gap / (2 * v * (v + tau2))
        assert log_lr == pytest.approx(math.log(1 / alpha))
    assert msprt_confidence_interval(cs, cn, ts, tn, previous_interval=(0.0, 0.005))[1] == 0.005
    assert msprt_confidence_interval(0, 0, 0, 0) == (-1.0, 1.0)

    # Simultaneous coverage: the running intersection contains the truth at all 20 looks in ≥ 95% of runs.
    runs, truth = 500, 0.01
    control, treatment, trials = _cumulative_counts(np.random.default_rng(5), runs, 0.05, 0.05 + truth)
    always_covered = 0
    for c_row, t_row in zip(control, treatment, strict=True):
        interval, ok = None, True
        for c, t, n in zip(c_row, t_row, trials, strict=True):
            interval = msprt_confidence_interval(int(c), int(n), int(t), int(n), previous_interval=interval)
            ok = ok and interval[0] <= truth <= interval[1]
        always_covered += ok
    assert always_covered / runs >= 0.95


# --------------------------------------------------------------------------- sample ratio mismatch


@pytest.mark.parametrize(
    ("counts", "weights"),
    [([5000, 5300], [1, 1]), ([900, 2100, 7000], [0.1, 0.2, 0.7]), ([480, 520], [50, 50]), ([30, 70], [1, 9])],
)
def test_srm_bayes_factor_is_the_dirichlet_multinomial_marginal_over_the_multinomial(counts, weights):
    # The Bayes factor from scipy's own distributions: Dirichlet-multinomial (prior mean = the
    # split, total concentration 100) against the configured multinomial, at the observed counts.
    theta = np.asarray(weights, float) / np.sum(weights)
    n = int(np.sum(counts))
    oracle = stats.dirichlet_multinomial.logpmf(counts, 100.0 * theta, n) - stats.multinomial.logpmf(counts, n, theta)
    result = sample_ratio_mismatch(counts, weights)
    assert result.log_bayes_factor == pytest.approx(oracle)
    assert result.p_value == pytest.approx(min(1.0, math.exp(-oracle)))
    assert result.expected_counts == pytest.approx(tuple(theta * n))


def test_srm_flags_an_assignment_bug_but_not_noise():
    assert sample_ratio_mismatch([600, 400], [0.5, 0.5]).mismatch  # 60/40 where 50/50 was configured
    assert sample_ratio_mismatch([200, 800], [0.1, 0.9]).mismatch  # the 10 % arm got twice its share
    assert not sample_ratio_mismatch([5000, 5050], [0.5, 0.5]).mismatch
    assert not sample_ratio_mismatch([103, 897], [0.1, 0.9]).mismatch
    # More users make the same skew more convincing.
    many, few = sample_ratio_mismatch([5000, 5400], [0.5, 0.5]), sample_ratio_mismatch([500, 540], [0.5, 0.5])
    assert many.p_value < few.p_value


def test_srm_stays_valid_when_looked_at_after_every_batch_where_a_chi_square_would_not():
    # 2,000 healthy 50/50 experiments, each looked at after every 50 new users up to 5,000 users:
    # the sequential test fails at most alpha of them; a chi-square at each look fails several times that.
    rng = np.random.default_rng(11)
    alpha, runs, looks, batch = 0.05, 2000, 100, 50
    treatment = np.cumsum(rng.binomial(batch, 0.5, size=(runs, looks)), axis=1)
    total = batch * np.arange(1, looks + 1)
    sequential = np.zeros(runs, bool)
    chi_square = np.zeros(runs, bool)
    for look in range(looks):
        for run in range(runs):
            counts = [int(treatment[run, look]), int(total[look] - treatment[run, look])]
            if not sequential[run]:
                sequential[run] = sample_ratio_mismatch(counts, [1, 1], alpha=alpha).mismatch
        split = np.stack([treatment[:, look], total[look] - treatment[:, look]])
        chi_square |= stats.chisquare(split, axis=0).pvalue < alpha
    assert sequential.mean() <= alpha
    assert chi_square.mean() > 3 * alpha


def test_srm_edge_cases():
    empty = sample_ratio_mismatch([0, 0], [1, 1])
    assert (empty.log_bayes_factor, empty.p_value, empty.mismatch) == (0.0, 1.0, False)
    leaked = sample_ratio_mismatch([100, 100, 3], [1, 1, 0])  # traffic in an arm configured to get none
    assert leaked.mismatch and leaked.p_value == 0.0 and math.isinf(leaked.log_bayes_factor)
    dropped = sample_ratio_mismatch([100, 110, 0], [1, 1, 0])
    assert dropped.log_bayes_factor == pytest.approx(sample_ratio_mismatch([100, 110], [1, 1]).log_bayes_factor)
    halves = sample_ratio_mismatch([50.5, 49.5], [1, 1])  # counts divided by the number of routers
    assert 0 < halves.p_value <= 1 and not halves.mismatch


@pytest.mark.parametrize(
    ("counts", "weights", "kwargs", "named"),
    [([-1, 5], [1, 1], {}, "observed_counts[0]"), ([1, math.nan], [1, 1], {}, "observed_counts[1]"),
     ([1, 5], [1, -1], {}, "expected_weights[1]"), ([1, 5], [0, 0], {}, "expected_weights"),
     ([1, 5], [1, 1], {"concentration": 0}, "concentration"), ([1, 5], [1, 1], {"alpha": 1.5}, "alpha"),
     ([1], [1], {}, "at least two arms"), ([1, 2], [1], {}, "same length")],
)
def test_srm_refuses_bad_input_naming_it(counts, weights, kwargs, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        sample_ratio_mismatch(counts, weights, **kwargs)


# --------------------------------------------------------------------------- per-user means (Welch)


def test_ratio_metric_lift_matches_scipy_welch():
    rng = np.random.default_rng(3)
    control = rng.gamma(2.0, 10.0, 800)
    treatment = rng.gamma(2.0, 11.0, 600)
    r = ratio_metric_lift(
        float(control.sum()), float((control**2).sum()), control.size,
        float(treatment.sum()), float((treatment**2).sum()), treatment.size,
    )  # fmt: skip
    oracle = stats.ttest_ind(treatment, control, equal_var=False)
    ci = oracle.confidence_interval(0.95)
    assert r.t == pytest.approx(oracle.statistic)
    assert r.p_value == pytest.approx(oracle.pvalue)
    assert r.df == pytest.approx(oracle.df)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high))
    assert r.relative_lift == pytest.approx(treatment.mean() / control.mean() - 1)


def test_ratio_metric_lift_with_constant_values():
    same = ratio_metric_lift(20.0, 40.0, 10, 20.0, 40.0, 10)  # every user spent 2.0 in both arms
    assert (same.difference, same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 0.0, 0.0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: two_proportion_test(-1, 10, 1, 10), "control_successes"),
        (lambda: two_proportion_test(1, 10, 11, 10), "treatment_successes"),
        (lambda: two_proportion_test(1, -10, 1, 10), "control_trials"),
        (lambda: two_proportion_test(0, 0, 1, 10), "control_trials"),
        (lambda: two_proportion_test(1.5, 10, 1, 10), "control_successes"),
        (lambda: two_proportion_test(1, 10, 1, 10, alpha=1.0), "alpha"),
        (lambda: msprt_p_value(1, 10, 1, 10, tau_squared=0.0), "tau_squared"),
        (lambda: msprt_p_value(1, 10, 1, 10, previous_p_value=1.5), "previous_p_value"),
        (lambda: msprt_p_value(5, 4, 1, 10), "control_successes"),
        (lambda: sequential_decision(1, 10, 1, 10, min_samples=-1), "min_samples"),
        (lambda: sequential_decision(1, 10, -1, 10), "treatment_successes"),
        (lambda: msprt_confidence_interval(1, 10, 1, 10, previous_interval=(0.2, 0.1)), "previous_interval"),
        (lambda: sample_ratio_mismatch([1, 2, 3], [1, 1]), "expected_weights"),
        (lambda: sample_ratio_mismatch([1, -2], [1, 1]), "observed_counts"),
        (lambda: sample_ratio_mismatch([1, 2], [1, -1]), "expected_weights"),
        (lambda: sample_ratio_mismatch([1, 2], [0, 0]), "expected_weights"),
        (lambda: sample_ratio_mismatch([1, 2], [0.5, 0.5], alpha=0), "alpha"),
        (lambda: ratio_metric_lift(10.0, 20.0, 1, 10.0, 20.0, 5), "control_n"),
        (lambda: ratio_metric_lift(10.0, 1.0, 5, 10.0, 30.0, 5), "control_values_sumsq"),
        (lambda: ratio_metric_lift(10.0, 30.0, 5, math.nan, 30.0, 5), "treatment_values_sum"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --------------------------------------------------------------------------- normal-data mSPRT (GMV per user)


def test_normal_msprt_is_the_proportion_msprt_given_the_same_variance():
    from recops.experiments.statistics import normal_msprt_interval, normal_msprt_p_value

    cs, cn, ts, tn = 100, 2000, 140, 2000
    pooled = (cs + ts) / (cn + tn)
    pooled_variance = pooled * (1 - pooled) * (1 / cn + 1 / tn)
    diff = ts / tn - cs / cn
    assert normal_msprt_p_value(diff, pooled_variance, 1e-4) == pytest.approx(msprt_p_value(cs, cn, ts, tn))
    pc, pt = cs / cn, ts / tn
    unpooled = pc * (1 - pc) / cn + pt * (1 - pt) / tn
    assert normal_msprt_interval(diff, unpooled, 0.05, 1e-4) == pytest.approx(
        msprt_confidence_interval(cs, cn, ts, tn, alpha=0.05)
    )
    assert normal_msprt_p_value(0.3, 0.0, 1.0) == 1.0
    assert normal_msprt_interval(0.3, 0.0, 0.05, 1.0) == (-math.inf, math.inf)
    for call, name in [
        (lambda: normal_msprt_p_value(math.nan, 1.0, 1.0), "difference"),
        (lambda: normal_msprt_p_value(0.1, -1.0, 1.0), "variance"),
        (lambda: normal_msprt_interval(0.1, 1.0, 0.05, 0.0), "tau_squared"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
