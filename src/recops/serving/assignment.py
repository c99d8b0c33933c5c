"""Sticky, monotone user → arm assignment for the A/B router.

A user's arm is a pure function of ``(salt, user_id, arms)``: no state, so every router
replica (and an offline analysis job) agrees on it without coordination.

Hashing
    ``bucket(salt, user_id) = int.from_bytes(sha256(salt_utf8 + b"\\x00" + user_id_utf8)[:8], "big") % 10_000``.
    The salt may not contain NUL, so the first NUL in the hashed bytes always ends the salt and
    ``("ab", "c")`` and ``("a", "bc")`` hash different byte strings. The modulo bias of reducing a
    64-bit integer mod 10,000 is below 1e-15 per bucket, far under any detectable effect.

Weights
    Integer basis points: one basis point (0.01%) is exactly one of the 10,000 buckets, so a weight
    *is* a bucket count and the realised layout has no rounding.

Layout (what makes ramps monotone)
    The **last** arm is control; every earlier arm is a treatment. With K treatments each owns a
    fixed slot of ``10_000 // K`` buckets starting at ``k * (10_000 // K)`` and takes the first
    ``weight`` buckets of its slot; control takes every bucket no treatment took. Hence:

    * Raising any treatment's weight (taking the difference from control) only moves control users
      into that treatment: every user already in any treatment stays where they are. This holds for
      each treatment independently, e.g. ramping two treatments 5%/5% → 10%/10% keeps everyone.
    * Lowering a treatment's weight moves only that treatment's highest buckets back to control.
    * Not monotone: changing the *number* or *order* of arms moves the slots and reshuffles users;
      treat that as a new experiment (and give it a new salt).
    * The cost: a treatment may hold at most its slot, ``10_000 // K`` bp (all 10,000 for the
      ordinary two-arm test, 5,000 each with two treatments). Control has no cap.

    For two arms this is exactly "treatment gets buckets [0, w), control the rest".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

BUCKETS = 10_000
"""Number of hash buckets; also the total of the arm weights in basis points."""


def _check_salt(salt: str) -> bytes:
    # A NUL inside the salt would make the salt/user_id boundary ambiguous and break injectivity.
    if "\x00" in salt:
        raise ValueError("salt must not contain a NUL character ('\\x00'): it separates salt from user_id")
    return salt.encode("utf-8") + b"\x00"


def _salt_without_nul(salt: str) -> str:
    _check_salt(salt)
    return salt


Salt = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_salt_without_nul)]
"""An assignment salt as a spec or config field: non-empty, no NUL (it separates salt from user id)."""


def _bucket_of(prefix: bytes, user_id: str) -> int:
    digest = hashlib.sha256(prefix + user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in ``[0, BUCKETS)`` for this experiment salt.

    Hashes ``salt.encode("utf-8") + b"\\x00" + user_id.encode("utf-8")`` with SHA-256 and reduces
    the first 8 digest bytes, read big-endian, modulo ``BUCKETS``.

    Raises:
        ValueError: if ``salt`` contains NUL (it would make the encoding ambiguous).
    """
    return _bucket_of(_check_salt(salt), user_id)


class Arm(BaseModel):
    """One arm of an experiment: a unique name and its share of traffic in basis points."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Arm name, unique within the experiment.")
    # Strict so that 10.5 or True is refused instead of silently becoming an integer.
    weight_bp: int = Field(ge=0, le=BUCKETS, strict=True, description="Share of users in basis points (0.01%).")

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("arm name must not be blank")
        return name


def _coerce_arm(item: Any) -> Any:
    # Accept ("name", weight) pairs as shorthand; anything else is left for pydantic to validate.
    if isinstance(item, Sequence) and not isinstance(item, str | bytes) and len(item) == 2:
        return {"name": item[0], "weight_bp": item[1]}
    return item


class ArmWeights(BaseModel):
    """The ordered arms of one experiment; the last arm is control.

    ``arms`` accepts a mapping ``{"treatment": 1000, "control": 9000}`` (insertion order kept),
    a sequence of ``(name, weight_bp)`` pairs, or ``Arm`` objects. Weights are basis points and
    must sum to ``BUCKETS`` (10,000 = 100%). See the module docstring for the bucket layout.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arms: Annotated[tuple[Arm, ...], Field(description="Arms in order; the last one is control.")]

    @field_validator("arms", mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return [{"name": name, "weight_bp": weight} for name, weight in value.items()]
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return [_coerce_arm(item) for item in value]
        return value

    @field_validator("arms")
    @classmethod
    def _valid_layout(cls, arms: tuple[Arm, ...]) -> tuple[Arm, ...]:
        if not arms:
            raise ValueError("at least one arm is required")
        names = [arm.name for arm in arms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"arm names must be unique; duplicated: {duplicates}")
        total = sum(arm.weight_bp for arm in arms)
        if total != BUCKETS:
            raise ValueError(f"arm weights must sum to {BUCKETS} bp (100%), got {total} bp")
        treatments = arms[:-1]
        if treatments:
            slot = BUCKETS // len(treatments)
            for arm in treatments:
                if arm.weight_bp > slot:
                    raise ValueError(
                        f"treatment arm {arm.name!r} has {arm.weight_bp} bp but may hold at most {slot} bp "
                        f"({BUCKETS} // {len(treatments)} treatment arms) so that ramps stay monotone"
                    )
        return arms

    @classmethod
    def two_arm(cls, treatment_bp: int, *, treatment: str = "treatment", control: str = "control") -> ArmWeights:
        """A treatment/control experiment with ``treatment_bp`` basis points in treatment."""
        return cls(arms=((treatment, treatment_bp), (control, BUCKETS - treatment_bp)))

    @property
    def names(self) -> tuple[str, ...]:
        """Arm names in order (control last)."""
        return tuple(arm.name for arm in self.arms)

    @property
    def control(self) -> str:
        """Name of the control arm (the last one)."""
        return self.arms[-1].name

    def treatment_ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open bucket range ``[start, end)`` of each treatment arm; control has all other buckets."""
        treatments = self.arms[:-1]
        if not treatments:
            return {}
        slot = BUCKETS // len(treatments)
        return {arm.name: (k * slot, k * slot + arm.weight_bp) for k, arm in enumerate(treatments)}

    @property
    def _table(self) -> np.ndarray:
        return _bucket_table(self)

    def arm_of_bucket(self, bucket_index: int) -> str:
        """The arm that owns ``bucket_index`` (in ``[0, BUCKETS)``)."""
        if not 0 <= bucket_index < BUCKETS:
            raise ValueError(f"bucket must be in [0, {BUCKETS}), got {bucket_index}")
        return self.arms[int(self._table[bucket_index])].name


@lru_cache(maxsize=256)
def _bucket_table(arms: ArmWeights) -> np.ndarray:
    # bucket -> arm index, built once per distinct (hashable, immutable) ArmWeights so assignment is one
    # lookup. Cached here rather than on the instance: a cached array in the model's __dict__ would break
    # pydantic's field-by-field __eq__.
    table = np.full(BUCKETS, len(arms.arms) - 1, dtype=np.int32)
    for index, (start, end) in enumerate(arms.treatment_ranges().values()):
        table[start:end] = index
    table.flags.writeable = False
    return table


def assign(salt: str, user_id: str, arms: ArmWeights) -> str:
    """The arm ``user_id`` sees in the experiment identified by ``salt``.

    Deterministic: the same ``(salt, user_id, arms)`` always gives the same arm.
    """
    return arms.arm_of_bucket(bucket(salt, user_id))


def assign_many(salt: str, user_ids: Sequence[str], arms: ArmWeights) -> list[str]:
    """``assign`` for many users at once; same result, salt checked and table looked up once."""
    prefix = _check_salt(salt)
    # SHA-256 has no vectorised form in numpy, so hashing stays a loop; the arm lookup is vectorised.
    buckets = np.fromiter((_bucket_of(prefix, user_id) for user_id in user_ids), dtype=np.int64, count=len(user_ids))
    names = arms.names
    return [names[index] for index in arms._table[buckets].tolist()]
