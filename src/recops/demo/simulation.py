"""Simulated users against a running router: recommend, react, report feedback, count per arm.

Each page view is one ``POST /v1/recommend`` by a visiting user with their history; the user then
reacts to the slate the way a :class:`Behaviour` says (clicks, likes, carts, purchases) and the
reactions go back to ``POST /v1/feedback`` in batches. Everything the router answered is counted per
arm (the arm named in the response), so the totals can be compared with the router's own metrics
and with what the gates decided.

Determinism: page view number ``j`` of a run always gets the same user and the same uniforms (drawn
from the seeded generator when the page view is taken from the schedule, which happens one at a time
on the event loop). Histories do not change during a run and the models are deterministic, so with
``n_requests`` the per-arm totals do not depend on how concurrent requests interleave; only
latencies and the time series do. With ``duration_s`` how many page views fit is timing, of course.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx
import numpy as np
import polars as pl

if TYPE_CHECKING:
    from recops.data.interactions import InteractionData
    from recops.data.synthetic import SyntheticDataset

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile."""

FEEDBACK_BATCH = 100
"""The router's default ``limits.maxFeedbackBatch``."""

_UNIFORMS = 4  # per shown item: click, like, cart, purchase


# --------------------------------------------------------------------------- behaviour


@dataclass(frozen=True)
class Reactions:
    """How one user reacts to one slate, per shown item (arrays of the slate's length).

    The funnel is the synthetic generator's: a click, then independently a like and a cart, and a
    purchase only after a cart. ``value`` is what a purchase of the item is worth (its price).
    """

    click: np.ndarray  # P(click | shown at this position)
    like_given_click: np.ndarray
    cart_given_click: np.ndarray
    purchase_given_cart: np.ndarray
    value: np.ndarray

    @property
    def purchase_given_click(self) -> np.ndarray:
        """P(purchase | click): carting then buying."""
        return self.cart_given_click * self.purchase_given_cart


@runtime_checkable
class Behaviour(Protocol):
    """A model of users: given a user and the items shown, in order, how likely each reaction is."""

    def reactions(self, user_id: str, item_ids: Sequence[str]) -> Reactions:
        """Probabilities for the slate ``item_ids`` (position 0 = top) shown to ``user_id``."""
        ...


@dataclass(frozen=True)
class FixedBehaviour:
    """Every user reacts to every item with the same probabilities (smoke tests, load tests)."""

    click: float = 0.1
    like_given_click: float = 0.3
    cart_given_click: float = 0.1
    purchase_given_cart: float = 0.4
    value: float = 10.0

    def reactions(self, user_id: str, item_ids: Sequence[str]) -> Reactions:
        n = len(item_ids)
        return Reactions(
            click=np.full(n, self.click),
            like_given_click=np.full(n, self.like_given_click),
            cart_given_click=np.full(n, self.cart_given_click),
            purchase_given_cart=np.full(n, self.purchase_given_cart),
            value=np.full(n, self.value),
        )


class SyntheticBehaviour:
    """The synthetic generator's hidden preferences: exactly the funnel that produced the training log.

    Click probability includes the generator's position bias (the slate position is the index in the
    response); like and cart probabilities rise with the user's affinity for the item, a cart turns
    into a purchase with the generator's fixed probability, and a purchase is worth the item's price.
    Users and items must come from ``dataset`` (a KeyError names unknown ids).
    """

    def __init__(self, dataset: SyntheticDataset) -> None:
        from recops.data import synthetic

        self.dataset = dataset
        self._preferences = dataset.preferences
        # The generator's funnel constants: the same numbers produced the training log.
        self._like_bias, self._like_slope = synthetic.LIKE_BIAS, synthetic.LIKE_SLOPE
        self._cart_bias, self._cart_slope = synthetic.CART_BIAS, synthetic.CART_SLOPE
        self._purchase_given_cart = synthetic.PURCHASE_GIVEN_CART
        # Preference arrays are in item_id order; the catalog frame is too, but do not rely on it.
        prices = dict(zip(dataset.items["item_id"].to_list(), dataset.items["price"].to_list(), strict=True))
        self._price = np.array([prices.get(item) or 0.0 for item in self._preferences.item_ids], dtype=float)

    def reactions(self, user_id: str, item_ids: Sequence[str]) -> Reactions:
        preferences = self._preferences
        n = len(item_ids)
        users = np.full(n, preferences.user_index([user_id])[0])
        items = preferences.item_index(list(item_ids))
        positions = np.arange(n)
        affinity = preferences.affinity_by_index(users, items)
        click_logit = preferences.click_logit_by_index(users, items, positions)
        return Reactions(
            click=_sigmoid(click_logit),
            like_given_click=_sigmoid(self._like_bias + self._like_slope * affinity),
            cart_given_click=_sigmoid(self._cart_bias + self._cart_slope * affinity),
            purchase_given_cart=np.full(n, self._purchase_given_cart),
            value=self._price[items],
        )


class MovieLensBehaviour:
    """Held-out ratings as ground truth (MovieLens has no clicks, prices or purchases).

    A user "clicks" a shown item exactly when they rated it in the held-out split, and "likes" it
    exactly when that rating was 4 or more (the recops MovieLens convention, see
    :mod:`recops.data.movielens`); nobody carts or buys. So the CTR of an arm is its hit rate on the
    held-out ratings: an offline metric replayed through the online loop. Position does not matter.
    """

    def __init__(self, held_out: pl.DataFrame) -> None:
        """``held_out``: columns ``user_id``, ``item_id`` and ``like`` (0/1) or ``rating`` (1-5)."""
        from recops.data.movielens import LIKE_RATING

        if "like" in held_out.columns:
            liked = held_out["like"].cast(pl.Int64) > 0
        elif "rating" in held_out.columns:
            liked = held_out["rating"] >= LIKE_RATING
        else:
            raise ValueError(f"held-out ratings need a 'like' or 'rating' column, got {held_out.columns}")
        self._rated: dict[tuple[str, str], bool] = {}
        for user, item, like in zip(held_out["user_id"].cast(pl.String).to_list(),
                                    held_out["item_id"].cast(pl.String).to_list(), liked.to_list(), strict=True):
            self._rated[(user, item)] = self._rated.get((user, item), False) or bool(like)

    @classmethod
    def from_interactions(cls, data: InteractionData, split: str = "test") -> MovieLensBehaviour:
        """The held-out engagements of an indexed dataset (``test``, ``valid`` or ``cold_test``)."""
        frame: pl.DataFrame = getattr(data, split)
        return cls(_with_ids(data, frame).select("user_id", "item_id", "like"))

    def __len__(self) -> int:
        return len(self._rated)

    def reactions(self, user_id: str, item_ids: Sequence[str]) -> Reactions:
        rated = [self._rated.get((user_id, item)) for item in item_ids]
        n = len(item_ids)
        return Reactions(
            click=np.array([r is not None for r in rated], dtype=float),
            like_given_click=np.array([bool(r) for r in rated], dtype=float),
            cart_given_click=np.zeros(n),
            purchase_given_cart=np.zeros(n),
            value=np.zeros(n),
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _with_ids(data: InteractionData, frame: pl.DataFrame) -> pl.DataFrame:
    """An interaction frame with ``user_id`` and ``item_id`` columns added to its dense indices."""
    users = pl.Series("user_id", data.user_ids, dtype=pl.String)
    items = data.items["item_id"].cast(pl.String)
    return frame.with_columns(
        users.gather(frame["user_idx"]).alias("user_id"), items.gather(frame["item_idx"]).alias("item_id")
    )


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class SimulatedUsers:
    """Who visits and what history each sends: item ids, oldest first, at most the model's limit.

    A page view picks a user at random, uniformly or in proportion to ``weights`` (e.g. activity).
    Histories stay fixed during a run (a user's own clicks are not appended), which keeps totals
    independent of the order requests complete in.
    """

    user_ids: tuple[str, ...]
    histories: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.user_ids:
            raise ValueError("SimulatedUsers needs at least one user")
        if len(self.histories) != len(self.user_ids):
            raise ValueError(f"{len(self.user_ids)} users but {len(self.histories)} histories")
        if self.weights is not None:
            weights = np.asarray(self.weights, dtype=float)
            if len(weights) != len(self.user_ids) or not np.all(np.isfinite(weights)) or (weights < 0).any() \
                    or weights.sum() <= 0:
                raise ValueError("weights must be one finite, non-negative number per user, not all zero")

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def from_interactions(
        cls, data: InteractionData, max_history: int = 20, user_ids: Sequence[str] | None = None
    ) -> SimulatedUsers:
        """Every user of ``data`` (or ``user_ids``) with their training-split history, the last ``max_history``.

        Users without training engagements visit with an empty history (the model's cold-start path).
        """
        if max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {max_history}")
        train = _with_ids(data, data.train).sort("user_id", "timestamp", "item_idx")
        grouped = train.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
        by_user = dict(zip(grouped["user_id"].to_list(), grouped["item_id"].to_list(), strict=True))
        chosen = list(data.user_ids if user_ids is None else user_ids)
        histories = tuple(tuple(by_user.get(user, [])[-max_history:] if max_history else ()) for user in chosen)
        return cls(tuple(chosen), histories)


# --------------------------------------------------------------------------- results


def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (nan, nan) without trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    # Exact ends at 0 and all successes, where rounding would leave a 1e-18 instead of the bound.
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return low, high


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Latency:
    """Summary of recommend latencies in milliseconds, as the client saw them (None: no requests)."""

    count: int = 0
    mean_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Latency:
        if len(values_ms) == 0:
            return cls()
        values = np.asarray(values_ms, dtype=float)
        p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
        return cls(len(values), float(values.mean()), p50, p95, p99, float(values.max()))


@dataclass(frozen=True)
class ArmStats:
    """Totals of one arm over a run. Feedback counts are events the router accepted (202).

    ``requests`` are page views the arm served (200), ``users`` the distinct users among them. A user
    moved to another arm by a weight change counts in both arms here, while the router's
    ``recops_assigned_users_total`` counts each user once per experiment (in the first arm it saw).
    Failed page views carry no arm: they are in :attr:`SimulationResult.errors`.
    ``gmv_user_sumsq`` is Σ over the arm's users of (that user's GMV)², for the GMV-per-user interval.
    """

    arm: str
    requests: int = 0
    users: int = 0
    impressions: int = 0
    clicks: int = 0
    likes: int = 0
    carts: int = 0
    purchases: int = 0
    gmv: float = 0.0
    gmv_user_sumsq: float = 0.0
    latency: Latency = field(default_factory=Latency)

    @property
    def ctr(self) -> float:
        """Clicks per impression."""
        return _ratio(self.clicks, self.impressions)

    @property
    def ctr_interval(self) -> tuple[float, float]:
        """95% Wilson interval of the CTR."""
        return wilson_interval(self.clicks, self.impressions)

    @property
    def like_rate(self) -> float:
        """Likes per impression (the like-rate gate's definition)."""
        return _ratio(self.likes, self.impressions)

    @property
    def like_rate_interval(self) -> tuple[float, float]:
        return wilson_interval(self.likes, self.impressions)

    @property
    def page_views_per_user(self) -> float:
        return _ratio(self.requests, self.users)

    @property
    def gmv_per_user(self) -> float:
        """Purchase value per distinct user (the GMV gate's definition)."""
        return _ratio(self.gmv, self.users)

    @property
    def gmv_per_user_interval(self) -> tuple[float, float]:
        """Normal 95% interval of the per-user mean GMV (users who bought nothing count as 0)."""
        if self.users < 2:
            return math.nan, math.nan
        mean = self.gmv / self.users
        variance = max(self.gmv_user_sumsq / self.users - mean * mean, 0.0) * self.users / (self.users - 1)
        half = Z_95 * math.sqrt(variance / self.users)
        return mean - half, mean + half

    def to_json(self) -> dict[str, Any]:
        """The counts plus every derived metric (NaN as null)."""
        counts = {k: v for k, v in asdict(self).items() if k != "latency"}
        low, high = self.ctr_interval
        gmv_low, gmv_high = self.gmv_per_user_interval
        derived = {
            "ctr": self.ctr, "ctr_low": low, "ctr_high": high, "like_rate": self.like_rate,
            "page_views_per_user": self.page_views_per_user, "gmv_per_user": self.gmv_per_user,
            "gmv_per_user_low": gmv_low, "gmv_per_user_high": gmv_high,
        }
        return {**counts, **{k: _finite_or_none(v) for k, v in derived.items()}, "latency": asdict(self.latency)}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> ArmStats:
        names = {f for f in cls.__dataclass_fields__ if f != "latency"}
        return cls(**{k: v for k, v in payload.items() if k in names}, latency=Latency(**payload.get("latency", {})))


@dataclass(frozen=True)
class TickPoint:
    """One arm at one tick: cumulative counts since the start, and the latency of this tick's window."""

    t_s: float  # seconds since the run's origin
    requests: int
    users: int
    impressions: int
    clicks: int
    likes: int
    carts: int
    purchases: int
    gmv: float
    window_requests: int  # page views served in this tick's window
    latency_p50_ms: float | None = None  # of the window; None when it had no requests
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None

    @property
    def ctr(self) -> float:
        return _ratio(self.clicks, self.impressions)

    @property
    def ctr_interval(self) -> tuple[float, float]:
        return wilson_interval(self.clicks, self.impressions)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SimulationResult:
    """A run's totals per arm, its time series per arm, and what went wrong.

    ``errors`` counts failed calls by kind: ``"recommend 503"``, ``"recommend ReadTimeout"``,
    ``"feedback 503"`` (each retried), ``"feedback 422"`` (not retried)... ``lost_events`` are
    feedback events never accepted (retries exhausted or refused); ``retries`` feedback re-posts.
    """

    arms: dict[str, ArmStats]
    series: dict[str, tuple[TickPoint, ...]]
    errors: dict[str, int]
    page_views: int  # attempted recommend calls, served or not
    lost_events: int
    retries: int
    started_s: float  # relative to the origin the ticks use
    duration_s: float
    finished: bool = True  # False for the snapshots handed to on_tick

    def to_json(self) -> dict[str, Any]:
        return {
            "arms": {name: stats.to_json() for name, stats in self.arms.items()},
            "series": {name: [point.to_json() for point in points] for name, points in self.series.items()},
            "errors": dict(self.errors),
            "page_views": self.page_views,
            "lost_events": self.lost_events,
            "retries": self.retries,
            "started_s": self.started_s,
            "duration_s": self.duration_s,
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> SimulationResult:
        return cls(
            arms={name: ArmStats.from_json(stats) for name, stats in payload["arms"].items()},
            series={name: tuple(TickPoint(**p) for p in points) for name, points in payload["series"].items()},
            errors=dict(payload["errors"]),
            page_views=payload["page_views"],
            lost_events=payload["lost_events"],
            retries=payload["retries"],
            started_s=payload["started_s"],
            duration_s=payload["duration_s"],
            finished=payload.get("finished", True),
        )


# --------------------------------------------------------------------------- the run


@dataclass
class _Arm:
    """Mutable running totals of one arm."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    likes: int = 0
    carts: int = 0
    purchases: int = 0
    gmv: float = 0.0
    users: set[str] = field(default_factory=set)
    user_gmv: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    window_ms: list[float] = field(default_factory=list)

    def stats(self, name: str) -> ArmStats:
        sumsq = float(sum(v * v for v in self.user_gmv.values()))
        return ArmStats(name, self.requests, len(self.users), self.impressions, self.clicks, self.likes,
                        self.carts, self.purchases, self.gmv, sumsq, Latency.of(self.latencies_ms))

    def tick(self, t_s: float) -> TickPoint:
        window = Latency.of(self.window_ms)
        self.window_ms = []
        return TickPoint(t_s, self.requests, len(self.users), self.impressions, self.clicks, self.likes, self.carts,
                         self.purchases, self.gmv, window.count, window.p50_ms, window.p95_ms, window.p99_ms)


@dataclass(frozen=True)
class _PageView:
    index: int
    user: int
    uniforms: np.ndarray  # (k, 4)


class _Run:
    """State of one :func:`simulate` call (single event loop: no locks needed)."""

    def __init__(self, client: httpx.AsyncClient, users: SimulatedUsers, behaviour: Behaviour, *, k: int,
                 rng: np.random.Generator, n_requests: int | None, deadline: float | None,
                 stop: asyncio.Event | None, feedback_batch: int, max_retries: int, max_retry_after_s: float,
                 origin: float) -> None:
        self.client, self.users, self.behaviour, self.k, self.rng = client, users, behaviour, k, rng
        self.n_requests, self.deadline, self.stop = n_requests, deadline, stop
        self.feedback_batch, self.max_retries, self.max_retry_after_s = feedback_batch, max_retries, max_retry_after_s
        self.origin = origin
        self.cdf = None if users.weights is None else np.cumsum(users.weights) / np.sum(users.weights)
        self.taken = 0
        self.arms: dict[str, _Arm] = {}
        self.series: dict[str, list[TickPoint]] = {}
        self.errors: Counter[str] = Counter()
        self.pending: list[tuple[str, dict[str, Any]]] = []  # (arm, feedback event) not yet posted
        self.lost_events = 0
        self.retries = 0
        self.started = time.monotonic()

    def now_s(self) -> float:
        return time.monotonic() - self.origin

    def take(self) -> _PageView | None:
        """The next page view of the schedule, or None when the run is over.

        Synchronous on purpose: the draws for page view j happen in schedule order whichever worker
        takes it, so a seed fixes every page view's user and uniforms.
        """
        if self.n_requests is not None and self.taken >= self.n_requests:
            return None
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        if self.stop is not None and self.stop.is_set():
            return None
        if self.cdf is None:
            user = int(self.rng.integers(len(self.users)))
        else:
            user = min(int(np.searchsorted(self.cdf, self.rng.random(), side="right")), len(self.users) - 1)
        view = _PageView(self.taken, user, self.rng.random((self.k, _UNIFORMS)))
        self.taken += 1
        return view

    def arm(self, name: str) -> _Arm:
        arm = self.arms.get(name)
        if arm is None:
            arm = self.arms[name] = _Arm()
        return arm

    async def worker(self, think_s: float) -> None:
        while (view := self.take()) is not None:
            await self.visit(view)
            if think_s > 0:
                await asyncio.sleep(think_s)

    async def visit(self, view: _PageView) -> None:
        user_id = self.users.user_ids[view.user]
        body = {"user_id": user_id, "history": list(self.users.histories[view.user]), "k": self.k}
        started = time.perf_counter()
        try:
            response = await self.client.post("/v1/recommend", json=body)
        except httpx.HTTPError as error:
            self.errors[f"recommend {type(error).__name__}"] += 1
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200:
            self.errors[f"recommend {response.status_code}"] += 1
            if response.status_code == 503:  # overloaded: this user backs off as asked before the next page view
                await asyncio.sleep(self._retry_after(response))
            return
        answer = response.json()
        name, request_id = answer["arm"], answer["request_id"]
        item_ids = [item["item_id"] for item in answer["items"]][: self.k]
        arm = self.arm(name)
        arm.requests += 1
        arm.impressions += len(item_ids)
        arm.users.add(user_id)
        arm.latencies_ms.append(elapsed_ms)
        arm.window_ms.append(elapsed_ms)
        if not item_ids:
            return
        self.pending.extend((name, event) for event in self.react(user_id, item_ids, view.uniforms, name, request_id))
        while len(self.pending) >= self.feedback_batch:
            await self.flush_one()

    def react(self, user_id: str, item_ids: list[str], uniforms: np.ndarray, arm: str,
              request_id: str) -> list[dict[str, Any]]:
        """The feedback events of one slate: the behaviour's probabilities against pre-drawn uniforms."""
        reactions = self.behaviour.reactions(user_id, item_ids)
        u = uniforms[: len(item_ids)]
        click = u[:, 0] < reactions.click
        like = click & (u[:, 1] < reactions.like_given_click)
        cart = click & (u[:, 2] < reactions.cart_given_click)
        purchase = cart & (u[:, 3] < reactions.purchase_given_cart)
        events = []
        for position in np.flatnonzero(click).tolist():
            base = {"user_id": user_id, "item_id": item_ids[position], "request_id": request_id, "arm": arm}
            events.append({**base, "event": "click"})
            if like[position]:
                events.append({**base, "event": "like"})
            if cart[position]:
                events.append({**base, "event": "cart"})
            if purchase[position]:
                events.append({**base, "event": "purchase", "value": round(float(reactions.value[position]), 2)})
        return events

    async def flush_one(self) -> None:
        """Post the oldest batch of pending events (taken first, so concurrent flushes never overlap)."""
        batch, self.pending = self.pending[: self.feedback_batch], self.pending[self.feedback_batch :]
        if batch:
            await self.post(batch)

    async def flush_all(self) -> None:
        while self.pending:
            await self.flush_one()

    async def post(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        body = {"events": [event for _, event in batch]}
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            try:
                response = await self.client.post("/v1/feedback", json=body)
            except httpx.TransportError as error:  # at-least-once: a lost answer may mean a double count
                self.errors[f"feedback {type(error).__name__}"] += 1
                await asyncio.sleep(min(0.1 * 2**attempt, self.max_retry_after_s))
                continue
            if response.status_code == 202:
                self.count(batch)
                return
            self.errors[f"feedback {response.status_code}"] += 1
            if _too_big(response) and len(batch) > 1:
                # Over limits.maxBodyBytes or maxFeedbackBatch: send halves, and smaller batches from now on.
                half = len(batch) // 2
                self.feedback_batch = max(1, min(self.feedback_batch, half))
                await self.post(batch[:half])
                await self.post(batch[half:])
                return
            if response.status_code != 503:  # refused: retrying the same body cannot help
                break
            await asyncio.sleep(self._retry_after(response))
        self.lost_events += len(batch)

    def count(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for name, event in batch:
            arm = self.arm(name)
            kind = event["event"]
            if kind == "click":
                arm.clicks += 1
            elif kind == "like":
                arm.likes += 1
            elif kind == "cart":
                arm.carts += 1
            else:
                value = event["value"]
                arm.purchases += 1
                arm.gmv += value
                arm.user_gmv[event["user_id"]] = arm.user_gmv.get(event["user_id"], 0.0) + value

    def _retry_after(self, response: httpx.Response) -> float:
        try:
            seconds = float(response.headers.get("retry-after", "1"))
        except ValueError:  # an HTTP date: not worth parsing for a local router
            seconds = 1.0
        return min(max(seconds, 0.0), self.max_retry_after_s)

    def record_tick(self) -> None:
        t_s = self.now_s()
        for name, arm in self.arms.items():
            self.series.setdefault(name, []).append(arm.tick(t_s))

    def result(self, finished: bool) -> SimulationResult:
        return SimulationResult(
            arms={name: arm.stats(name) for name, arm in self.arms.items()},
            series={name: tuple(points) for name, points in self.series.items()},
            errors=dict(sorted(self.errors.items())),
            page_views=self.taken,
            lost_events=self.lost_events,
            retries=self.retries,
            started_s=self.started - self.origin,
            duration_s=time.monotonic() - self.started,
            finished=finished,
        )


def _too_big(response: httpx.Response) -> bool:
    """413, or the 422 that names only ``events``: the batch is over one of the router's limits."""
    if response.status_code == 413:
        return True
    if response.status_code != 422:
        return False
    try:
        return response.json().get("fields") == ["events"]
    except ValueError:
        return False


OnTick = Callable[[SimulationResult], Awaitable[None] | None]


async def simulate(
    client: httpx.AsyncClient,
    users: SimulatedUsers,
    behaviour: Behaviour,
    *,
    rng: np.random.Generator,
    duration_s: float | None = None,
    n_requests: int | None = None,
    concurrency: int = 8,
    k: int = 10,
    tick_s: float = 1.0,
    on_tick: OnTick | None = None,
    think_s: float = 0.0,
    feedback_batch: int = FEEDBACK_BATCH,
    max_retries: int = 30,
    max_retry_after_s: float = 5.0,
    stop: asyncio.Event | None = None,
    origin: float | None = None,
) -> SimulationResult:
    """Run ``concurrency`` virtual users against the router behind ``client`` and count what happened per arm.

    The run ends after ``n_requests`` page views, after ``duration_s`` seconds, or when ``stop`` is
    set, whichever comes first (at least one must be given). Each page view asks ``/v1/recommend``
    for ``k`` items, draws reactions from ``behaviour`` and queues them; full batches of
    ``feedback_batch`` events are posted by the worker that filled them, the rest every tick and at
    the end. A 503 is retried after its Retry-After (capped at ``max_retry_after_s``) up to
    ``max_retries`` times; a recommend 503 is counted and the user backs off before the next page view.

    Every ``tick_s`` seconds each arm's cumulative totals and window latency are appended to the
    series and ``on_tick`` (sync or async) gets a snapshot. ``origin`` (a ``time.monotonic()``
    instant, default now) is time zero of the series, so a caller can put the simulation and the
    experiment's steps on one clock.
    """
    if n_requests is None and duration_s is None and stop is None:
        raise ValueError("give n_requests, duration_s or stop: the run needs an end")
    if n_requests is not None and n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    if concurrency < 1 or k < 1 or tick_s <= 0 or feedback_batch < 1 or max_retries < 0:
        raise ValueError("concurrency, k and feedback_batch must be >= 1, tick_s > 0 and max_retries >= 0")
    now = time.monotonic()
    run = _Run(client, users, behaviour, k=k, rng=rng, n_requests=n_requests,
               deadline=None if duration_s is None else now + duration_s, stop=stop,
               feedback_batch=feedback_batch, max_retries=max_retries, max_retry_after_s=max_retry_after_s,
               origin=now if origin is None else origin)

    async def notify(result: SimulationResult) -> None:
        if on_tick is not None:
            answer = on_tick(result)
            if inspect.isawaitable(answer):
                await answer

    done = asyncio.Event()

    async def ticker() -> None:
        next_tick = time.monotonic() + tick_s
        while True:
            try:
                # asyncio.timeout: wait_for may swallow a cancellation on Python 3.11.
                async with asyncio.timeout(max(next_tick - time.monotonic(), 0.0)):
                    await done.wait()
                return  # stopped between ticks, never in the middle of a flush (that would drop its batch)
            except TimeoutError:
                pass
            next_tick = max(next_tick + tick_s, time.monotonic())  # late: one tick now, not a burst
            # Partial batches go out every tick, so the gates never wait long for slow traffic's feedback;
            # only what is pending now, so busy workers refilling the queue cannot hold the ticker forever.
            for _ in range(math.ceil(len(run.pending) / feedback_batch)):
                await run.flush_one()
            run.record_tick()
            await notify(run.result(False))

    async def workers() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for n in range(concurrency):
                    group.create_task(run.worker(think_s), name=f"recops-simulated-user-{n}")
        finally:
            done.set()

    # One group: a failing worker (say, a behaviour that does not know a user) stops the ticker, and a
    # failing on_tick stops the workers, instead of either running on unnoticed.
    async with asyncio.TaskGroup() as group:
        group.create_task(workers(), name="recops-simulated-users")
        group.create_task(ticker(), name="recops-simulation-ticker")
    await run.flush_all()
    run.record_tick()
    result = run.result(True)
    await notify(result)
    return result
