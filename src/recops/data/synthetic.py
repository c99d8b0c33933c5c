"""A deterministic synthetic e-commerce log: the default dataset for demos and tests.

The generator draws a catalog of items described by words, a population of users
with a hidden taste over those words, and then simulates what an exposure policy
showed them and what they did: ``impression`` → ``click`` → ``like`` / ``cart`` →
``purchase``. Because a user's click probability is a function of the words in an
item's title and description, a text model can recover the signal, which is what
makes brand-new ("cold") items recommendable. Popularity also matters (a Zipf-like
quality term and a popularity-skewed exposure policy), so "most popular" is a
baseline worth beating rather than a straw man.

The log is deliberately a little dirty, so cleaning has work to do: a few users are
bots firing hundreds of events a minute, and a small fraction of rows is duplicated.

Everything is vectorised numpy; the only Python loops run once per item (to write
its text) or once per event type. The same :class:`SyntheticConfig` always gives
identical frames.

Data contracts:

* events: ``user_id`` (Utf8, ``"U000123"``), ``item_id`` (Utf8, ``"P00042"``),
  ``event`` (Utf8, one of :data:`EVENT_TYPES`), ``timestamp`` (Int64 unix seconds),
  ``device`` (Utf8), ``request_id`` (Utf8, shared by every event a recommendation
  request caused), ``value`` (Float64, the price on ``purchase`` rows, null otherwise).
* items: ``item_id``, ``title``, ``category``, ``description``, ``price`` (Float64),
  ``created_at`` (Int64 unix seconds).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import polars as pl

from recops.data.schema import EVENT_SCHEMA, EVENT_TYPES, ITEM_SCHEMA

# Event codes follow the order of the contract's EVENT_TYPES.
IMPRESSION, CLICK, LIKE, CART, PURCHASE = range(len(EVENT_TYPES))

DEFAULT_START = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400

# Category name → (median price, attribute words). Words are unique across
# categories so that a word names one category's attribute; shared adjectives
# live in SHARED_ADJECTIVES.
CATEGORIES: dict[str, tuple[float, tuple[str, ...]]] = {
    "running shoes": (110.0, (
        "cushioned", "trail", "marathon", "breathable", "carbon-plated", "waterproof", "grippy",
        "responsive", "wide-fit", "neutral", "stability", "reflective", "knit", "racing", "zero-drop",
    )),
    "headphones": (150.0, (
        "wireless", "noise-cancelling", "over-ear", "in-ear", "bass-heavy", "studio", "foldable",
        "bluetooth", "hi-fi", "gaming", "sweatproof", "low-latency", "open-back", "long-battery",
        "transparent-mode",
    )),
    "coffee makers": (180.0, (
        "espresso", "drip", "pour-over", "programmable", "thermal", "built-in-grinder", "milk-frothing",
        "single-serve", "cold-brew", "stainless", "barista-grade", "french-press", "capsule",
        "dual-boiler", "quick-heat",
    )),
    "yoga mats": (45.0, (
        "non-slip", "cork", "extra-thick", "travel", "alignment-marked", "natural-rubber", "hot-yoga",
        "reversible", "sweat-absorbing", "joint-friendly", "jute", "microfiber", "tacky", "pilates",
        "closed-cell",
    )),
    "backpacks": (80.0, (
        "hiking", "laptop", "rolltop", "anti-theft", "daypack", "hydration-ready", "expandable",
        "weatherproof", "ergonomic", "carry-on", "padded", "urban", "multi-pocket", "trekking", "ripstop",
    )),
    "face serums": (35.0, (
        "hydrating", "vitamin-c", "retinol", "fragrance-free", "hyaluronic", "niacinamide", "brightening",
        "anti-aging", "oil-free", "vegan", "sensitive-skin", "overnight", "exfoliating", "peptide",
        "dermatologist-tested",
    )),
    "board games": (40.0, (
        "strategy", "cooperative", "party", "family", "deck-building", "trivia", "worker-placement",
        "two-player", "fantasy", "sci-fi", "bluffing", "legacy", "dice", "tile-laying", "kid-friendly",
    )),
    "kitchen knives": (70.0, (
        "chef", "santoku", "damascus", "serrated", "high-carbon", "japanese", "forged", "paring",
        "ceramic", "full-tang", "razor-sharp", "bread", "boning", "nakiri", "whetstone-ready",
    )),
    "smartwatches": (250.0, (
        "gps", "heart-rate", "sleep-tracking", "amoled", "lte", "swim-proof", "fitness", "solar",
        "always-on", "titanium", "ecg", "rugged", "slim", "multisport", "contactless-pay",
    )),
    "desk lamps": (50.0, (
        "led", "dimmable", "architect", "clamp-on", "touch-control", "warm-white", "usb-charging",
        "swing-arm", "eye-care", "daylight", "smart", "wireless-charging", "adjustable", "retro", "reading",
    )),
    "tents": (220.0, (
        "ultralight", "two-person", "family-size", "backpacking", "freestanding", "four-season", "pop-up",
        "storm-proof", "dome", "tunnel", "double-wall", "quick-pitch", "mesh", "festival", "car-camping",
    )),
    "novels": (16.0, (
        "mystery", "thriller", "romance", "epic-fantasy", "science-fiction", "historical", "literary",
        "cozy", "dystopian", "coming-of-age", "noir", "gothic", "award-winning", "page-turner", "translated",
    )),
}
SHARED_ADJECTIVES = (
    "premium", "classic", "compact", "durable", "eco-friendly", "everyday", "modern", "vintage",
    "bestselling", "handcrafted", "budget", "deluxe", "minimalist", "limited-edition", "essential",
)
DESCRIPTION_TEMPLATES = (
    "{Adj} {cat} that are {w1}, {w2} and {w3}. Made to be used every day.",
    "These {w1} {cat} pair {w2} comfort with {w3} styling. {Adj} quality at a fair price.",
    "{Adj} and {w1}: {cat} with {w2} and {w3} details.",
    "Our {adj} {cat}, now {w1} and {w2}, with a {w3} twist for this season.",
)

# Devices of a user's main screen, with their shares; a session is on "Web"
# instead with WEB_SESSION_SHARE, because people also browse from a laptop.
DEVICES = ("iOS17.2", "iOS17.4", "iOS16.7", "Android14", "Android13", "Android12", "Web")
DEVICE_SHARES = (0.20, 0.15, 0.05, 0.20, 0.12, 0.08, 0.20)
WEB = DEVICES.index("Web")
WEB_SESSION_SHARE = 0.15

ATTRIBUTE_WORDS_PER_ITEM = 3  # plus one shared adjective
WARM_ITEM_AGE = 365 * DAY  # warm items were listed up to a year before the log starts
COLD_WINDOW = (0.85, 0.95)  # cold items are listed in this slice of the period, so they get some traffic
FRESH_WINDOW = 7 * DAY  # what the exposure policy's "new arrivals" slot counts as new
PRICE_SPREAD = 0.35  # sigma of the log-normal price around a category's median

# Hidden taste. Scales were tuned (default config) for an overall human CTR of
# ~7.5%, ~0.2% in the bottom affinity decile and ~37% in the top one: a strong
# signal, so that models trained on a small log still separate clearly.
CATEGORY_CONCENTRATION = 0.3  # Dirichlet alpha: most users care about two or three categories
CATEGORY_SCALE = 1.0
CATEGORY_FLOOR = 0.05  # keeps log(share) finite for categories a user never looks at
WORD_SCALE = 0.6
USER_BIAS_SCALE = 0.4
ZIPF_EXPONENT = 1.0  # exposure weight of the item of popularity rank r is r**-ZIPF_EXPONENT
QUALITY_SCALE = 0.3  # click logit bonus per unit of -log(popularity rank)
CLICK_BIAS = -2.6
POSITION_DECAY = 0.35  # click logit lost per doubling of the slate position
LIKE_BIAS, LIKE_SLOPE = -0.8, 1.0  # P(like | click) rises with affinity
CART_BIAS, CART_SLOPE = -1.8, 0.6
PURCHASE_GIVEN_CART = 0.4

# Session shape (seconds).
REQUESTS_PER_SESSION = 3.0
REQUEST_GAP_MIN, REQUEST_GAP_MEAN = 20, 90.0
SESSION_MARGIN = 3_600  # sessions start at least this long before the log ends
REQUEST_COUNT_SHAPE = 2.0  # gamma shape of the per-user request rate: a few users are heavy users
CLICK_DELAY, LIKE_DELAY, CART_DELAY, PURCHASE_DELAY = 8.0, 20.0, 30.0, 90.0

# Bots fire a request every 0-1 s and click half of what they see, with no
# interest in the content, no likes and no carts.
BOT_CLICK_PROBABILITY = 0.5
BOT_MAX_GAP = 1

CANDIDATE_OVERSAMPLING = 3  # draws per slate slot before falling back to the exact sampler
EXACT_SAMPLER_CELLS = 1 << 22  # memory bound (matrix cells) of one batch of the exact sampler


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`generate`. Every field is validated on construction.

    ``requests_per_user`` is the mean number of recommendation requests of a
    (human) user; each request shows ``slate_size`` items. ``cold_fraction`` of the
    items are listed late in the period (in its last ~15%), so they are "cold"
    under a time split. ``bot_fraction`` of the users are bots issuing
    ``bot_requests`` requests in one burst. ``duplicate_fraction`` of the rows
    are repeated verbatim. The exposure policy fills each slot from the popular
    items with ``popular_share``, from the items listed in the last week with
    ``fresh_share``, and uniformly otherwise.
    """

    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = len(CATEGORIES)
    days: int = 30
    requests_per_user: float = 12.0
    slate_size: int = 10
    start_timestamp: int = DEFAULT_START
    cold_fraction: float = 0.1
    bot_fraction: float = 0.005
    bot_requests: int = 150
    duplicate_fraction: float = 0.002
    popular_share: float = 0.45
    fresh_share: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            # bool is an int subclass; True users is a bug, not a config.
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise ValueError(f"{spec.name} must be a number, got {value!r}")
        _require(self, "n_users", self.n_users >= 1, "must be >= 1")
        _require(self, "n_items", self.n_items >= 1, "must be >= 1")
        _require(
            self, "n_categories", 1 <= self.n_categories <= len(CATEGORIES),
            f"must be in [1, {len(CATEGORIES)}]",
        )
        _require(self, "days", self.days >= 1, "must be >= 1")
        _require(self, "requests_per_user", self.requests_per_user >= 1, "must be >= 1")
        _require(self, "slate_size", self.slate_size >= 1, "must be >= 1")
        _require(self, "start_timestamp", self.start_timestamp >= 0, "must be >= 0")
        _require(self, "cold_fraction", 0 <= self.cold_fraction < 1, "must be in [0, 1)")
        _require(self, "bot_fraction", 0 <= self.bot_fraction < 1, "must be in [0, 1)")
        _require(self, "bot_requests", self.bot_requests >= 1, "must be >= 1")
        _require(self, "duplicate_fraction", 0 <= self.duplicate_fraction < 1, "must be in [0, 1)")
        _require(self, "popular_share", 0 <= self.popular_share <= 1, "must be in [0, 1]")
        _require(self, "fresh_share", 0 <= self.fresh_share <= 1, "must be in [0, 1]")
        _require(
            self, "fresh_share", self.popular_share + self.fresh_share <= 1,
            "plus popular_share must be <= 1",
        )
        _require(self, "seed", self.seed >= 0, "must be >= 0")
        for name in ("n_users", "n_items", "n_categories", "days", "slate_size", "start_timestamp",
                     "bot_requests", "seed"):
            _require(self, name, float(getattr(self, name)).is_integer(), "must be an integer")

    @property
    def period(self) -> int:
        """Length of the log in seconds."""
        return int(self.days) * DAY

    @property
    def n_cold_items(self) -> int:
        """How many items are listed late in the period."""
        return int(self.cold_fraction * self.n_items)

    @property
    def n_bots(self) -> int:
        """How many users are bots: at least one whenever ``bot_fraction`` > 0."""
        if self.bot_fraction == 0:
            return 0
        return min(self.n_users, max(1, round(self.bot_fraction * self.n_users)))


def _require(config: SyntheticConfig, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"SyntheticConfig.{name} {requirement}, got {getattr(config, name)!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _position_bias(positions: np.ndarray) -> np.ndarray:
    return -POSITION_DECAY * np.log2(1.0 + positions)


def _index_of(ids: Sequence[str] | np.ndarray, known: np.ndarray, what: str) -> np.ndarray:
    """Indices of ``ids`` in the sorted id array ``known``; KeyError on unknown ids."""
    query = np.asarray(ids, dtype=str)
    if query.size == 0:
        return np.zeros(query.shape, dtype=np.int64)
    positions = np.clip(np.searchsorted(known, query), 0, len(known) - 1)
    unknown = known[positions] != query
    if unknown.any():
        raise KeyError(f"unknown {what} ids: {query[unknown][:5].tolist()}")
    return positions.astype(np.int64)


@dataclass(frozen=True, eq=False)
class PreferenceModel:
    """The hidden truth behind a synthetic log: who likes what, and how much.

    The affinity of user ``u`` for item ``i`` is the dot product of the user's
    taste vector with the item's binary feature vector (its category one-hot,
    then its words), i.e. ``category_weights[u, category(i)]`` plus
    ``word_weights[u, w]`` summed over the item's words. The click probability of
    an item shown at slate position ``p`` is
    ``sigmoid(affinity + item_quality[i] + user_bias[u] + position_bias(p) + CLICK_BIAS)``.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    categories: tuple[str, ...]
    vocabulary: tuple[str, ...]
    category_weights: np.ndarray  # (n_users, n_categories)
    word_weights: np.ndarray  # (n_users, len(vocabulary))
    user_bias: np.ndarray  # (n_users,)
    item_category: np.ndarray  # (n_items,) index into categories
    item_words: np.ndarray  # (n_items, words per item) indices into vocabulary
    item_quality: np.ndarray  # (n_items,)

    def user_index(self, user_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row indices of ``user_ids``; raises KeyError for an unknown id."""
        return _index_of(user_ids, self.user_ids, "user")

    def item_index(self, item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row indices of ``item_ids``; raises KeyError for an unknown id."""
        return _index_of(item_ids, self.item_ids, "item")

    def affinity_by_index(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Affinity of each (user index, item index) pair; the inputs broadcast."""
        users, items = np.broadcast_arrays(np.asarray(users), np.asarray(items))
        category = self.category_weights[users, self.item_category[items]]
        words = self.word_weights[users[..., None], self.item_words[items]].sum(axis=-1)
        return category + words

    def click_logit_by_index(
        self, users: np.ndarray, items: np.ndarray, positions: np.ndarray | int = 0
    ) -> np.ndarray:
        """Click log-odds of each (user, item, slate position) triple; the inputs broadcast."""
        users, items, positions = np.broadcast_arrays(np.asarray(users), np.asarray(items), positions)
        return (
            self.affinity_by_index(users, items)
            + self.item_quality[items]
            + self.user_bias[users]
            + _position_bias(positions)
            + CLICK_BIAS
        )

    def affinity(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """Affinity of each (user, item) pair: the part of the click logit the item text explains."""
        return self.affinity_by_index(self.user_index(user_ids), self.item_index(item_ids))

    def click_probability(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        positions: Sequence[int] | np.ndarray | int = 0,
    ) -> np.ndarray:
        """P(click | shown) for each (user, item) pair, shown at ``positions`` (0 = top of the slate).

        ``user_ids``, ``item_ids`` and ``positions`` broadcast against each other,
        so one user can be scored against many items.
        """
        users, items = self.user_index(user_ids), self.item_index(item_ids)
        return _sigmoid(self.click_logit_by_index(users, items, np.asarray(positions)))

    def like_probability(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """P(like | click) for each (user, item) pair, as in the generated funnel."""
        return _sigmoid(LIKE_BIAS + LIKE_SLOPE * self.affinity(user_ids, item_ids))


@dataclass(frozen=True, eq=False)
class SyntheticDataset:
    """A generated log, its catalog and the hidden truth that produced them."""

    config: SyntheticConfig
    events: pl.DataFrame
    items: pl.DataFrame
    preferences: PreferenceModel
    bot_user_ids: tuple[str, ...]
    cold_item_ids: tuple[str, ...]

    def click_probability(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        positions: Sequence[int] | np.ndarray | int = 0,
    ) -> np.ndarray:
        """P(click | shown); see :meth:`PreferenceModel.click_probability`."""
        return self.preferences.click_probability(user_ids, item_ids, positions)

    def like_probability(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """P(like | click); see :meth:`PreferenceModel.like_probability`."""
        return self.preferences.like_probability(user_ids, item_ids)


@dataclass(frozen=True)
class _Catalog:
    """Item arrays in item-index order, plus the creation order the exposure policy needs."""

    category: np.ndarray
    words: np.ndarray
    price: np.ndarray
    created_at: np.ndarray
    popularity: np.ndarray  # exposure weight, Zipf over a random rank
    quality: np.ndarray
    by_creation: np.ndarray  # item indices, oldest first
    frame: pl.DataFrame


@dataclass(frozen=True)
class _Requests:
    user: np.ndarray
    timestamp: np.ndarray
    device: np.ndarray
    is_bot: np.ndarray


def _id_width(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def _format_ids(prefix: str, numbers: np.ndarray, width: int) -> pl.Series:
    """``prefix`` + zero-padded numbers, e.g. "U000123"; fixed width keeps string order = number order."""
    digits = pl.Series(numbers, dtype=pl.Int64).cast(pl.Utf8).str.zfill(width)
    return (prefix + digits).alias("id")


def _vocabulary(categories: Sequence[str]) -> tuple[str, ...]:
    words = [w for name in categories for w in CATEGORIES[name][1]]
    return tuple(dict.fromkeys([*words, *SHARED_ADJECTIVES]))


def _make_catalog(config: SyntheticConfig, rng: np.random.Generator, vocabulary: Sequence[str]) -> _Catalog:
    names = list(CATEGORIES)[: config.n_categories]
    n = config.n_items
    word_index = {w: i for i, w in enumerate(vocabulary)}
    category = rng.integers(0, len(names), n)

    # Per category: a random 3-word subset of its vocabulary for each of its items.
    words = np.empty((n, ATTRIBUTE_WORDS_PER_ITEM + 1), dtype=np.int64)
    for c, name in enumerate(names):
        members = np.flatnonzero(category == c)
        own = np.array([word_index[w] for w in CATEGORIES[name][1]])
        picks = rng.random((len(members), len(own))).argsort(axis=1)[:, :ATTRIBUTE_WORDS_PER_ITEM]
        words[members, :ATTRIBUTE_WORDS_PER_ITEM] = own[picks]
    adjectives = np.array([word_index[w] for w in SHARED_ADJECTIVES])
    words[:, ATTRIBUTE_WORDS_PER_ITEM] = adjectives[rng.integers(0, len(adjectives), n)]

    medians = np.array([CATEGORIES[name][0] for name in names])
    price = np.maximum(np.round(medians[category] * rng.lognormal(0.0, PRICE_SPREAD, n)), 2.0) - 0.01

    created_at = config.start_timestamp - rng.integers(1, WARM_ITEM_AGE, n)
    cold = rng.choice(n, config.n_cold_items, replace=False)
    lo, hi = (int(config.period * f) for f in COLD_WINDOW)
    created_at[cold] = config.start_timestamp + rng.integers(lo, hi, len(cold))

    rank = rng.permutation(n) + 1.0
    popularity = rank**-ZIPF_EXPONENT
    log_rank = np.log(rank)
    quality = QUALITY_SCALE * (log_rank.mean() - log_rank)

    templates = rng.integers(0, len(DESCRIPTION_TEMPLATES), n)
    codes = rng.integers(10, 100, n)
    letters = rng.integers(0, 26, n)
    titles, descriptions = [], []
    for i in range(n):  # one loop per item, to write its text
        w1, w2, w3, adj = (vocabulary[w] for w in words[i])
        cat = names[category[i]]
        titles.append(f"{w1.title()} {cat.title()} {w2.title()} {chr(65 + letters[i])}{codes[i]}")
        descriptions.append(
            DESCRIPTION_TEMPLATES[templates[i]].format(
                adj=adj, Adj=adj.capitalize(), cat=cat, w1=w1, w2=w2, w3=w3
            )
        )

    frame = pl.DataFrame(
        {
            "item_id": _format_ids("P", np.arange(n), _id_width(n, 5)),
            "title": titles,
            "category": [names[c] for c in category],
            "description": descriptions,
            "price": price,
            "created_at": created_at,
        },
        schema=ITEM_SCHEMA,
    )
    return _Catalog(
        category=category,
        words=words,
        price=price,
        created_at=created_at,
        popularity=popularity,
        quality=quality,
        by_creation=np.argsort(created_at, kind="stable"),
        frame=frame,
    )


def _make_preferences(
    config: SyntheticConfig,
    rng: np.random.Generator,
    catalog: _Catalog,
    vocabulary: tuple[str, ...],
) -> PreferenceModel:
    n_users, n_cat = config.n_users, config.n_categories
    shares = rng.dirichlet(np.full(n_cat, CATEGORY_CONCENTRATION), n_users)
    # log(n_cat * share) is 0 for a user with no preference, positive for favourites.
    category_weights = CATEGORY_SCALE * np.log(n_cat * shares + CATEGORY_FLOOR)
    return PreferenceModel(
        user_ids=_format_ids("U", np.arange(n_users), _id_width(n_users, 6)).to_numpy().astype(str),
        item_ids=catalog.frame["item_id"].to_numpy().astype(str),
        categories=tuple(list(CATEGORIES)[:n_cat]),
        vocabulary=vocabulary,
        category_weights=category_weights,
        word_weights=rng.normal(0.0, WORD_SCALE, (n_users, len(vocabulary))),
        user_bias=rng.normal(0.0, USER_BIAS_SCALE, n_users),
        item_category=catalog.category,
        item_words=catalog.words,
        item_quality=catalog.quality,
    )


def _group_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``values`` restarting at every True of ``starts`` (starts[0] must be True)."""
    total = np.cumsum(values)
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    return total - total[first][group] + values[first][group]


def _make_requests(config: SyntheticConfig, rng: np.random.Generator, bots: np.ndarray) -> _Requests:
    is_bot_user = np.zeros(config.n_users, dtype=bool)
    is_bot_user[bots] = True
    # A gamma-Poisson count: the mean is requests_per_user, but some users are much heavier.
    scale = (config.requests_per_user - 1) / REQUEST_COUNT_SHAPE
    rate = rng.gamma(REQUEST_COUNT_SHAPE, scale, config.n_users)
    counts = np.where(is_bot_user, config.bot_requests, 1 + rng.poisson(rate))
    user = np.repeat(np.arange(config.n_users), counts)  # every count is >= 1
    is_bot = is_bot_user[user]

    first_of_user = np.zeros(len(user), dtype=bool)
    first_of_user[np.cumsum(counts) - counts] = True
    # A bot's requests are one burst; a human starts a new session now and then.
    new_session = first_of_user | (~is_bot & (rng.random(len(user)) < 1 / REQUESTS_PER_SESSION))
    human_gap = REQUEST_GAP_MIN + rng.exponential(REQUEST_GAP_MEAN, len(user)).astype(np.int64)
    bot_gap = rng.integers(0, BOT_MAX_GAP + 1, len(user))
    gap = np.where(new_session, 0, np.where(is_bot, bot_gap, human_gap))

    session = np.cumsum(new_session) - 1
    n_sessions = int(session[-1]) + 1
    latest_start = max(config.period - SESSION_MARGIN, 1)
    session_start = config.start_timestamp + rng.integers(0, latest_start, n_sessions)
    timestamp = session_start[session] + _group_cumsum(gap, new_session)

    primary = rng.choice(len(DEVICES), config.n_users, p=DEVICE_SHARES)
    session_device = np.where(
        rng.random(n_sessions) < WEB_SESSION_SHARE, WEB, primary[user[new_session]]
    )
    device = np.where(is_bot, WEB, session_device[session])
    return _Requests(user=user, timestamp=timestamp, device=device, is_bot=is_bot)


def _sample_slates(
    config: SyntheticConfig, rng: np.random.Generator, catalog: _Catalog, timestamps: np.ndarray
) -> np.ndarray:
    """Items shown by each request, in slate order: an (n_requests, slate_size) array, -1 = empty slot.

    Only items listed by the request's time are eligible. Each slot is filled from a
    mixture: an item drawn by popularity (``popular_share``), one listed in the last
    week (``fresh_share``), or any eligible item. Slots within a slate are distinct.
    Drawing with replacement and keeping first occurrences is successive sampling
    without replacement, so a vectorised draw of ``CANDIDATE_OVERSAMPLING`` × slots
    candidates is kept wherever it yields enough distinct items; the rare rest (and
    slates wider than the eligible catalog) are redrawn with the exact, but
    O(n_items) per slate, Gumbel-top-k sampler. Keeping only the filled draws biases
    those slates very slightly against duplicate-prone (popular) items, which a
    synthetic exposure policy can live with.
    """
    created = catalog.created_at[catalog.by_creation]
    # Eligible items are a prefix of the creation order; the fresh ones its tail.
    n_eligible = np.searchsorted(created, timestamps, side="right")
    fresh_from = np.searchsorted(created, timestamps - FRESH_WINDOW, side="right")
    fresh_from = np.where(fresh_from < n_eligible, fresh_from, 0)  # nothing new: any item will do
    popularity_cum = np.cumsum(catalog.popularity[catalog.by_creation])

    n, slots = len(timestamps), config.slate_size
    draws = slots * CANDIDATE_OVERSAMPLING
    source = rng.random((n, draws))
    u = rng.random((n, draws))
    popular = np.minimum(
        np.searchsorted(popularity_cum, u * popularity_cum[n_eligible - 1][:, None], side="right"),
        n_eligible[:, None] - 1,
    )
    fresh = fresh_from[:, None] + (u * (n_eligible - fresh_from)[:, None]).astype(np.int64)
    uniform = (u * n_eligible[:, None]).astype(np.int64)
    fresh_cut = config.popular_share + config.fresh_share
    candidates = np.where(
        source < config.popular_share, popular, np.where(source < fresh_cut, fresh, uniform)
    )

    order = np.argsort(candidates, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    first_seen = np.ones_like(ranked, dtype=bool)
    first_seen[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    keep = np.empty_like(first_seen)
    np.put_along_axis(keep, order, first_seen, axis=1)
    keep &= np.cumsum(keep, axis=1) <= slots

    slates = np.full((n, slots), -1, dtype=np.int64)
    filled = keep.sum(axis=1) == slots
    slates[filled] = candidates[filled][keep[filled]].reshape(-1, slots)
    # Bounded batches: the exact sampler holds a (rows, n_items) matrix.
    rest = np.flatnonzero(~filled)
    batch = max(1, EXACT_SAMPLER_CELLS // len(popularity_cum))
    for lo in range(0, len(rest), batch):
        rows = rest[lo : lo + batch]
        slates[rows] = _gumbel_slates(config, rng, popularity_cum, n_eligible[rows], fresh_from[rows])
    return np.where(slates >= 0, catalog.by_creation[np.maximum(slates, 0)], -1)


def _gumbel_slates(
    config: SyntheticConfig,
    rng: np.random.Generator,
    popularity_cum: np.ndarray,
    n_eligible: np.ndarray,
    fresh_from: np.ndarray,
) -> np.ndarray:
    """Exact sampling without replacement from the exposure mixture (Gumbel top-k), in creation order."""
    position = np.arange(len(popularity_cum))[None, :]
    eligible = position < n_eligible[:, None]
    is_fresh = eligible & (position >= fresh_from[:, None])
    popularity = np.diff(popularity_cum, prepend=0.0)[None, :]
    weight = (
        config.popular_share * popularity / popularity_cum[n_eligible - 1][:, None]
        + config.fresh_share * is_fresh / is_fresh.sum(axis=1, keepdims=True)
        + (1 - config.popular_share - config.fresh_share) / n_eligible[:, None]
    )
    with np.errstate(divide="ignore"):
        keys = np.where(eligible, np.log(weight) + rng.gumbel(size=weight.shape), -np.inf)
    slots = min(config.slate_size, keys.shape[1])
    top = np.argsort(-keys, axis=1, kind="stable")[:, :slots]
    top = np.where(np.take_along_axis(eligible, top, axis=1), top, -1)
    return np.pad(top, ((0, 0), (0, config.slate_size - slots)), constant_values=-1)


def _delay(rng: np.random.Generator, mean: float, size: int) -> np.ndarray:
    """Whole seconds after the previous step; at least 1 so the funnel order is strict."""
    return 1 + rng.exponential(mean, size).astype(np.int64)


def generate(config: SyntheticConfig | None = None) -> SyntheticDataset:
    """Generate the event log, the item catalog and the hidden preference model for ``config``.

    Deterministic: the same config gives identical frames. Events are sorted by
    ``timestamp`` and, within a second, by request and funnel step.
    """
    config = config or SyntheticConfig()
    # Independent streams per stage, so changing one stage leaves the others' draws alone.
    catalog_rng, user_rng, request_rng, slate_rng, funnel_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(config.seed)).spawn(5)
    )
    vocabulary = _vocabulary(list(CATEGORIES)[: config.n_categories])
    catalog = _make_catalog(config, catalog_rng, vocabulary)
    preferences = _make_preferences(config, user_rng, catalog, vocabulary)
    bots = np.sort(user_rng.choice(config.n_users, config.n_bots, replace=False))
    requests = _make_requests(config, request_rng, bots)
    slates = _sample_slates(config, slate_rng, catalog, requests.timestamp)

    # One row per impression.
    request, position = np.nonzero(slates >= 0)
    item = slates[request, position]
    user = requests.user[request]
    is_bot = requests.is_bot[request]
    n = len(item)

    affinity = preferences.affinity_by_index(user, item)
    p_click = np.where(
        is_bot, BOT_CLICK_PROBABILITY, _sigmoid(preferences.click_logit_by_index(user, item, position))
    )
    p_like = np.where(is_bot, 0.0, _sigmoid(LIKE_BIAS + LIKE_SLOPE * affinity))
    p_cart = np.where(is_bot, 0.0, _sigmoid(CART_BIAS + CART_SLOPE * affinity))
    click = funnel_rng.random(n) < p_click
    like = click & (funnel_rng.random(n) < p_like)
    cart = click & (funnel_rng.random(n) < p_cart)
    purchase = cart & (funnel_rng.random(n) < PURCHASE_GIVEN_CART)

    shown_at = requests.timestamp[request]
    # Bots click the instant they see a slate.
    clicked_at = shown_at + np.where(is_bot, 1, _delay(funnel_rng, CLICK_DELAY, n))
    carted_at = clicked_at + _delay(funnel_rng, CART_DELAY, n)
    steps = (
        (IMPRESSION, np.ones(n, dtype=bool), shown_at),
        (CLICK, click, clicked_at),
        (LIKE, like, clicked_at + _delay(funnel_rng, LIKE_DELAY, n)),
        (CART, cart, carted_at),
        (PURCHASE, purchase, carted_at + _delay(funnel_rng, PURCHASE_DELAY, n)),
    )
    rows = np.concatenate([np.flatnonzero(mask) for _, mask, _ in steps])
    event = np.concatenate([np.full(int(mask.sum()), code) for code, mask, _ in steps])
    timestamp = np.concatenate([when[mask] for _, mask, when in steps])

    # Exact duplicates (a retried upload, say), for cleaning to count.
    duplicates = funnel_rng.choice(len(rows), int(config.duplicate_fraction * len(rows)), replace=False)
    rows = np.concatenate([rows, rows[duplicates]])
    event = np.concatenate([event, event[duplicates]])
    timestamp = np.concatenate([timestamp, timestamp[duplicates]])

    order = np.lexsort((position[rows], event, request[rows], timestamp))
    rows, event, timestamp = rows[order], event[order], timestamp[order]
    events = _events_frame(catalog, preferences, requests, request[rows], item[rows], event, timestamp)
    return SyntheticDataset(
        config=config,
        events=events,
        items=catalog.frame,
        preferences=preferences,
        bot_user_ids=tuple(preferences.user_ids[bots].tolist()),
        cold_item_ids=tuple(
            catalog.frame.filter(pl.col("created_at") >= config.start_timestamp)["item_id"].to_list()
        ),
    )


def _events_frame(
    catalog: _Catalog,
    preferences: PreferenceModel,
    requests: _Requests,
    request: np.ndarray,
    item: np.ndarray,
    event: np.ndarray,
    timestamp: np.ndarray,
) -> pl.DataFrame:
    """Turn per-row index arrays into the event-log frame (see the module docstring)."""
    n_requests = len(requests.timestamp)
    # Request ids count up in time order, like a server-side counter.
    request_rank = np.empty(n_requests, dtype=np.int64)
    request_rank[np.argsort(requests.timestamp, kind="stable")] = np.arange(n_requests)
    request_ids = _format_ids("R", request_rank, _id_width(n_requests, 8))
    value = np.where(event == PURCHASE, catalog.price[item], np.nan)
    return pl.DataFrame(
        {
            "user_id": pl.Series(preferences.user_ids).gather(requests.user[request]),
            "item_id": catalog.frame["item_id"].gather(item),
            "event": pl.Series(EVENT_TYPES).gather(event),
            "timestamp": timestamp.astype(np.int64),
            "device": pl.Series(DEVICES).gather(requests.device[request]),
            "request_id": request_ids.gather(request),
            "value": pl.Series(value, nan_to_null=True),
        },
        schema=EVENT_SCHEMA,
    )
