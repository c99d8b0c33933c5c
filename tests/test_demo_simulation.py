"""Simulated users against the in-process router: what they count is what the router counted."""

from __future__ import annotations

import itertools
import math

import httpx
import numpy as np
import polars as pl
import pytest

from _router import metric, router_config, serving, write_config
from recops.data.synthetic import SyntheticConfig, generate
from recops.demo.simulation import (
    ArmStats,
    Behaviour,
    FixedBehaviour,
    MovieLensBehaviour,
    Reactions,
    SimulatedUsers,
    SimulationResult,
    SyntheticBehaviour,
    simulate,
    wilson_interval,
)
from recops.serving.router.upstream import Ranked

# The tiny_model fixture trains on exactly this log (tests/conftest.py), so its ids are the generator's.
TINY_DATA = SyntheticConfig(n_users=150, n_items=80, days=10, seed=4)
COUNTED = {"clicks": "click", "likes": "like", "carts": "cart", "purchases": "purchase"}


@pytest.fixture(scope="module")
def dataset():
    return generate(TINY_DATA)


@pytest.fixture(scope="module")
def users(tiny_model):
    return SimulatedUsers.from_interactions(tiny_model[0], max_history=10)


@pytest.fixture
def config_path(tiny_model, tmp_path):
    config = router_config(tiny_model[2], tmp_path, limits={"maxBodyBytes": 65536})
    return write_config(tmp_path / "router.yaml", config)


def _router_counts(text: str, arm: str) -> dict[str, float]:
    labels = {"experiment": "exp", "arm": arm}
    counts = {name: metric(text, "recops_feedback_events_total", **labels, event=event)
              for name, event in COUNTED.items()}
    return {
        **counts,
        "requests": metric(text, "recops_assignments_total", **labels),
        "users": metric(text, "recops_assigned_users_total", **labels),
        "impressions": metric(text, "recops_impressions_total", **labels),
        "gmv": metric(text, "recops_purchase_value_total", **labels),
    }


def _totals(result: SimulationResult) -> dict[str, tuple]:
    return {
        name: (s.requests, s.users, s.impressions, s.clicks, s.likes, s.carts, s.purchases, round(s.gmv, 2))
        for name, s in result.arms.items()
    }


# --------------------------------------------------------------------------- pure parts


def test_synthetic_behaviour_is_the_generators_funnel(dataset):
    behaviour = SyntheticBehaviour(dataset)
    user, items = dataset.preferences.user_ids[7], dataset.preferences.item_ids[[3, 1, 40, 12]].tolist()
    reactions = behaviour.reactions(user, items)
    assert reactions.click == pytest.approx(dataset.click_probability([user] * 4, items, np.arange(4)))
    assert reactions.like_given_click == pytest.approx(dataset.like_probability([user] * 4, items))
    prices = dict(zip(dataset.items["item_id"], dataset.items["price"], strict=True))
    assert reactions.value.tolist() == [prices[i] for i in items]
    assert np.all((reactions.purchase_given_click > 0) & (reactions.purchase_given_click < reactions.cart_given_click))
    # Position bias: the same item is less likely to be clicked further down the slate.
    top, second = behaviour.reactions(user, items[:2]).click[0], behaviour.reactions(user, items[1::-1]).click[1]
    assert top > second
    with pytest.raises(KeyError, match="unknown user"):
        behaviour.reactions("nobody", items)


def test_movielens_behaviour_clicks_exactly_the_held_out_ratings(tiny_model):
    ratings = pl.DataFrame({"user_id": ["1", "1", "2"], "item_id": ["10", "11", "10"], "rating": [5, 3, 4]})
    behaviour = MovieLensBehaviour(ratings)
    reactions = behaviour.reactions("1", ["11", "12", "10"])
    assert reactions.click.tolist() == [1, 0, 1]
    assert reactions.like_given_click.tolist() == [0, 0, 1]
    assert not reactions.purchase_given_click.any() and not reactions.value.any()
    assert isinstance(behaviour, Behaviour)

    data = tiny_model[0]
    held_out = MovieLensBehaviour.from_interactions(data, "test")
    assert len(held_out) == data.test.select("user_idx", "item_idx").unique().height
    row = data.test.row(0, named=True)
    user, item = data.user_ids[row["user_idx"]], data.items["item_id"][row["item_idx"]]
    assert held_out.reactions(user, [item]).click.tolist() == [1.0]


def test_users_visit_with_their_training_history_oldest_first(tiny_model):
    data = tiny_model[0]
    users = SimulatedUsers.from_interactions(data, max_history=3)
    assert list(users.user_ids) == data.user_ids
    index = next(i for i in range(data.n_users) if data.train.filter(pl.col("user_idx") == i).height > 3)
    rows = data.train.filter(pl.col("user_idx") == index).sort("timestamp", "item_idx")
    assert list(users.histories[index]) == [data.items["item_id"][i] for i in rows["item_idx"].to_list()][-3:]
    assert SimulatedUsers.from_interactions(data, max_history=0).histories[index] == ()
    with pytest.raises(ValueError, match="weights"):
        SimulatedUsers(("a", "b"), ((), ()), weights=(0.0, 0.0))


def test_wilson_interval_and_arm_stats_json():
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))
    low, high = wilson_interval(10, 100)
    assert low < 0.1 < high and wilson_interval(100, 100)[1] == 1.0 and wilson_interval(0, 100)[0] == 0.0
    stats = ArmStats("control", requests=4, users=2, impressions=40, clicks=4, likes=2, purchases=1, gmv=30.0,
                     gmv_user_sumsq=900.0)
    payload = stats.to_json()
    assert payload["ctr"] == 0.1 and payload["page_views_per_user"] == 2 and payload["gmv_per_user"] == 15
    assert ArmStats.from_json(payload) == stats
    assert ArmStats("empty").to_json()["ctr"] is None


# --------------------------------------------------------------------------- against the router

@pytest.mark.slow
@pytest.mark.anyio
async def test_totals_per_arm_are_what_the_router_counted(config_path, users, dataset):
    behaviour = SyntheticBehaviour(dataset)
    async with serving(config_path) as (_, client):
        result = await simulate(client, users, behaviour, n_requests=150, concurrency=4, k=8,
                                rng=np.random.default_rng(1), tick_s=0.2)
        text = (await client.get("/metrics")).text
        # Same seed, one virtual user instead of four: the same page views, so the same totals.
        again = await simulate(client, users, behaviour, n_requests=150, concurrency=1, k=8,
                               rng=np.random.default_rng(1))
    assert set(result.arms) == {"treatment", "control"}
    assert result.page_views == 150 and not result.errors and result.lost_events == 0
    assert sum(s.requests for s in result.arms.values()) == 150
    for name, stats in result.arms.items():
        counted = _router_counts(text, name)
        assert counted.pop("gmv") == pytest.approx(stats.gmv)
        assert counted == {key: getattr(stats, key) for key in counted}, name
        assert stats.impressions == 8 * stats.requests and stats.latency.count == stats.requests
        assert stats.clicks > 0 and stats.latency.p50_ms <= stats.latency.p99_ms
    assert sum(s.purchases for s in result.arms.values()) > 0  # the funnel reaches purchases
    assert _totals(again) == _totals(result)
    # The last tick of each arm's series is its total.
    for name, stats in result.arms.items():
        last = result.series[name][-1]
        assert (last.requests, last.impressions, last.clicks) == (stats.requests, stats.impressions, stats.clicks)
    assert SimulationResult.from_json(result.to_json()) == result


@pytest.mark.slow
@pytest.mark.anyio
async def test_always_clicking_users_give_ctr_one_and_never_clicking_zero(tiny_model, tmp_path, users):
    # limits.maxBodyBytes 4096 refuses a batch of 100 clicks (413): the simulation halves its batches.
    config_path = write_config(tmp_path / "router.yaml", router_config(tiny_model[2], tmp_path))
    async with serving(config_path) as (_, client):
        always = await simulate(client, users, FixedBehaviour(click=1.0, like_given_click=0.0, cart_given_click=0.0),
                                n_requests=40, concurrency=4, k=5, rng=np.random.default_rng(2))
        never = await simulate(client, users, FixedBehaviour(click=0.0), n_requests=40, concurrency=4, k=5,
                               rng=np.random.default_rng(2))
        text = (await client.get("/metrics")).text
    assert always.errors["feedback 413"] >= 1 and set(always.errors) == {"feedback 413"}
    assert always.lost_events == 0
    for stats in always.arms.values():
        assert stats.ctr == 1.0 and stats.likes == 0 and stats.purchases == 0
    for stats in never.arms.values():
        assert stats.ctr == 0.0 and stats.clicks == stats.likes == stats.purchases == 0
    clicks = sum(metric(text, "recops_feedback_events_total", experiment="exp", arm=a, event="click")
                 for a in ("treatment", "control"))
    assert clicks == 40 * 5


class _Oracle:
    """An upstream that knows the hidden truth: the k items a user is most (or least) likely to click."""

    def __init__(self, dataset, best: bool) -> None:
        self.dataset, self.best = dataset, best
        self.items = dataset.preferences.item_ids

    async def recommend(self, user_id, history, k, candidates) -> Ranked:
        p = self.dataset.click_probability([user_id] * len(self.items), self.items, 0)
        order = np.argsort(-p if self.best else p, kind="stable")[:k]
        chosen = p[order].tolist()
        return Ranked(self.items[order].tolist(), chosen, chosen, chosen)

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class _Recording:
    """A behaviour that remembers the click probabilities it handed out."""

    def __init__(self, inner: Behaviour) -> None:
        self.inner, self.p = inner, []

    def reactions(self, user_id, item_ids) -> Reactions:
        reactions = self.inner.reactions(user_id, item_ids)
        self.p.extend(reactions.click.tolist())
        return reactions


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_arm_showing_more_clickable_items_gets_the_higher_ctr(config_path, users, dataset):
    behaviour = _Recording(SyntheticBehaviour(dataset))
    async with serving(config_path) as (app, client):
        arms = app.state.runtime.snapshot.arms
        arms["treatment"].upstream = _Oracle(dataset, best=True)
        arms["control"].upstream = _Oracle(dataset, best=False)
        result = await simulate(client, users, behaviour, n_requests=200, concurrency=4, k=5,
                                rng=np.random.default_rng(3))
    treatment, control = result.arms["treatment"], result.arms["control"]
    assert treatment.ctr_interval[0] > control.ctr_interval[1], (treatment.ctr, control.ctr)
    assert treatment.gmv_per_user > control.gmv_per_user
    # Clicks are Bernoulli draws of the behaviour's probabilities: their sum is within 4 sigma of Σp.
    p = np.array(behaviour.p)
    clicks = treatment.clicks + control.clicks
    assert abs(clicks - p.sum()) < 4 * math.sqrt((p * (1 - p)).sum())


class _Flaky(httpx.AsyncBaseTransport):
    """Answers 503 (Retry-After: 0) to the first ``recommend`` and ``feedback`` calls it is told to refuse."""

    def __init__(self, inner: httpx.AsyncBaseTransport, recommend: int, feedback: int) -> None:
        self.inner, self.refuse = inner, {"/v1/recommend": recommend, "/v1/feedback": feedback}
        self.refused = {"/v1/recommend": 0, "/v1/feedback": 0}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.refused.get(path, 0) < self.refuse.get(path, 0):
            self.refused[path] += 1
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "overloaded", "fields": []})
        return await self.inner.handle_async_request(request)


@pytest.mark.slow
@pytest.mark.anyio
async def test_503s_are_retried_not_lost(config_path, users):
    behaviour = FixedBehaviour(click=0.6, like_given_click=0.5, cart_given_click=0.5, purchase_given_cart=0.5)
    async with serving(config_path) as (app, _):
        flaky = _Flaky(httpx.ASGITransport(app=app), recommend=2, feedback=5)
        async with httpx.AsyncClient(transport=flaky, base_url="http://router") as client:
            result = await simulate(client, users, behaviour, n_requests=60, concurrency=3, k=5,
                                    feedback_batch=10, rng=np.random.default_rng(4))
            text = (await client.get("/metrics")).text
            # A router that never recovers: retries run out and the events are counted as lost.
            stuck = _Flaky(httpx.ASGITransport(app=app), recommend=0, feedback=10**6)
            async with httpx.AsyncClient(transport=stuck, base_url="http://router") as stuck_client:
                lost = await simulate(stuck_client, users, behaviour, n_requests=5, k=5, max_retries=2,
                                      rng=np.random.default_rng(5))
    assert result.errors == {"feedback 503": 5, "recommend 503": 2}
    assert result.retries == 5 and result.lost_events == 0
    assert result.page_views == 60 and sum(s.requests for s in result.arms.values()) == 58
    for name, stats in result.arms.items():
        for key, event in COUNTED.items():
            assert metric(text, "recops_feedback_events_total", experiment="exp", arm=name, event=event) == getattr(
                stats, key
            )
    events = sum(s.clicks + s.likes + s.carts + s.purchases for s in lost.arms.values())
    assert events == 0 and lost.lost_events > 0
    assert lost.errors["feedback 503"] == 3 * lost.retries // 2  # every batch: one try and two retries


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_timed_run_ticks_and_reports_progress(config_path, users):
    snapshots = []
    async with serving(config_path) as (_, client):
        result = await simulate(client, users, FixedBehaviour(), duration_s=1.2, tick_s=0.2, concurrency=2, k=5,
                                think_s=0.01, rng=np.random.default_rng(6), on_tick=snapshots.append)
    assert len(snapshots) >= 3 and snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
    assert snapshots[-1] == result and result.duration_s >= 1.2
    for points in result.series.values():
        times = [p.t_s for p in points]
        assert times == sorted(times)
        assert all(a.impressions <= b.impressions and a.clicks <= b.clicks for a, b in itertools.pairwise(points))
        assert sum(p.window_requests for p in points) == points[-1].requests
        low, high = points[-1].ctr_interval
        assert low <= points[-1].ctr <= high
