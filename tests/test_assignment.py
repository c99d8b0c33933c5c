"""Sticky A/B assignment: deterministic, salted, unambiguous, on-weight and monotone under ramps."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from recops.serving.assignment import BUCKETS, Arm, ArmWeights, assign, assign_many, bucket

USERS = [f"user-{i}" for i in range(100_000)]


def test_bucket_matches_documented_encoding() -> None:
    digest = hashlib.sha256(b"exp-1" + b"\x00" + "ü-42".encode()).digest()
    assert bucket("exp-1", "ü-42") == int.from_bytes(digest[:8], "big") % BUCKETS
    assert all(0 <= bucket("s", u) < BUCKETS for u in USERS[:1000])


def test_assignment_is_deterministic() -> None:
    arms = ArmWeights.two_arm(5000)
    first = [assign("exp-1", u, arms) for u in USERS[:2000]]
    assert first == [assign("exp-1", u, arms) for u in USERS[:2000]]
    assert first == assign_many("exp-1", USERS[:2000], ArmWeights.two_arm(5000))


def test_salt_changes_the_assignment() -> None:
    arms = ArmWeights.two_arm(5000)
    a = assign_many("exp-1", USERS[:2000], arms)
    b = assign_many("exp-2", USERS[:2000], arms)
    # Independent 50/50 splits agree on about half of the users, never on (nearly) all of them.
    assert 0.4 < sum(x == y for x, y in zip(a, b, strict=True)) / len(a) < 0.6


def test_salt_user_boundary_is_unambiguous() -> None:
    assert bucket("ab", "c") != bucket("a", "bc")
    assert bucket("", "abc") != bucket("a", "bc")
    with pytest.raises(ValueError, match="NUL"):
        bucket("a\x00b", "c")
    with pytest.raises(ValueError, match="NUL"):
        assign_many("a\x00b", ["c"], ArmWeights.two_arm(5000))


@pytest.mark.parametrize("treatment_bp", [5000, 1000])
def test_realised_split_matches_weights(treatment_bp: int) -> None:
    arms = ArmWeights.two_arm(treatment_bp)
    assigned = assign_many("split-check", USERS, arms)
    observed = [assigned.count("treatment"), assigned.count("control")]
    expected = [len(USERS) * treatment_bp / BUCKETS, len(USERS) * (BUCKETS - treatment_bp) / BUCKETS]
    assert chisquare(observed, expected).pvalue > 0.001


def test_three_arm_split_matches_weights() -> None:
    arms = ArmWeights(arms={"a": 2000, "b": 3000, "control": 5000})
    assigned = assign_many("three", USERS, arms)
    observed = [assigned.count(name) for name in arms.names]
    assert chisquare(observed, [20_000, 30_000, 50_000]).pvalue > 0.001


def test_raising_treatment_keeps_every_treated_user() -> None:
    def treated(bp: int) -> set[str]:
        assigned = assign_many("ramp", USERS, ArmWeights.two_arm(bp))
        return {u for u, arm in zip(USERS, assigned, strict=True) if arm == "treatment"}

    at_0, at_10, at_20, at_50, at_100 = (treated(bp) for bp in (0, 1000, 2000, 5000, 10_000))
    assert not at_0
    assert at_10 and at_10 <= at_20 <= at_50 <= at_100
    assert at_100 == set(USERS)


def test_two_treatments_ramp_monotonically_and_independently() -> None:
    before = assign_many("multi", USERS, ArmWeights(arms={"a": 500, "b": 500, "control": 9000}))
    after = assign_many("multi", USERS, ArmWeights(arms={"a": 1000, "b": 2000, "control": 7000}))
    for old, new in zip(before, after, strict=True):
        # Only control users may move; treated users never switch to another arm.
        assert old == "control" or new == old


def test_treatment_ranges_layout() -> None:
    assert ArmWeights.two_arm(1000).treatment_ranges() == {"treatment": (0, 1000)}
    three = ArmWeights(arms=[("a", 3000), ("b", 1000), ("control", 6000)])
    assert three.treatment_ranges() == {"a": (0, 3000), "b": (5000, 6000)}
    assert three.control == "control"
    owners = [three.arm_of_bucket(i) for i in (0, 2999, 3000, 4999, 5000, 5999, 6000, 9999)]
    assert owners == ["a", "a", "control", "control", "b", "b", "control", "control"]
    assert ArmWeights(arms={"only": BUCKETS}).arm_of_bucket(1234) == "only"


def test_arm_weights_accept_mapping_pairs_and_arm_objects() -> None:
    expected = ArmWeights(arms=[Arm(name="t", weight_bp=1000), Arm(name="c", weight_bp=9000)])
    assert ArmWeights(arms={"t": 1000, "c": 9000}) == expected
    assert ArmWeights(arms=[("t", 1000), ("c", 9000)]) == expected
    assert ArmWeights(arms=[{"name": "t", "weight_bp": 1000}, {"name": "c", "weight_bp": 9000}]) == expected
    with pytest.raises(ValidationError):
        expected.arms = ()  # frozen


def _error_text(arms: object) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        ArmWeights(arms=arms)
    first = info.value.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"]


@pytest.mark.parametrize(
    ("arms", "loc", "message"),
    [
        ({"t": 1000, "c": 8000}, "arms", "sum to 10000 bp (100%), got 9000"),
        ({"t": 6000, "c": 6000}, "arms", "got 12000"),
        ({"t": -100, "c": 10_100}, "arms.0.weight_bp", "greater than or equal to 0"),
        ([("t", 5000), ("t", 5000)], "arms", "unique; duplicated: ['t']"),
        ([("", 5000), ("c", 5000)], "arms.0.name", "at least 1 character"),
        ([("  ", 5000), ("c", 5000)], "arms.0.name", "blank"),
        ([], "arms", "at least one arm"),
        ({}, "arms", "at least one arm"),
        ({"t": 10.5, "c": 9989.5}, "arms.0.weight_bp", "valid integer"),
        ({"a": 6000, "b": 1000, "c": 3000}, "arms", "'a' has 6000 bp but may hold at most 5000"),
    ],
)
def test_invalid_weights_are_named(arms: object, loc: str, message: str) -> None:
    got_loc, got_message = _error_text(arms)
    assert got_loc == loc
    assert message in got_message


def test_arm_of_bucket_range_checked() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10000\)"):
        ArmWeights.two_arm(1000).arm_of_bucket(BUCKETS)
