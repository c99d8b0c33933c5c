"""Is the online log still the data the model was trained on? Checks before a retrain.

The seed lost 27% of its CTR silently because serving fed the model features that no longer matched
training. ``recops check-features`` compares an online log (the router's feedback log) with the
training events, column by column, and refuses on a mismatch with a report naming the columns:

- **columns**: every training column is present online (an absent one would be read as nulls);
- **dtypes**: each column has the same kind of values (numbers, text, booleans);
- **nulls**: the share of missing values has not moved by more than ``max_null_change``;
- **ranges**: numeric values stay within the training range widened by ``range_margin`` of its span on
  each side (new items bring new prices; a unit change, cents for euros, lands far outside): at most
  ``max_out_of_range`` of the values outside;
- **distributions**: the population stability index (PSI) of each column against training stays under
  ``psi_threshold``: over its values for categorical columns, over ten training-quantile bins for
  numeric ones, and over the *shape* of identifiers (``P00017`` → ``A99999``) for high-cardinality text,
  where new values are expected but a new format is not.

Time columns move forward by nature: ``timestamp`` is checked for presence, dtype and nulls only, and so
is ``request_id``: it groups a response's events and is no feature, and its format is whatever the
serving system that logged it makes (the router's ids need not look like the historical log's).
Every check is a pure function of the two frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recops.data.io import DataFormatError, file_format, resolve_uri

TIME_COLUMNS = frozenset({"timestamp", "created_at"})
PRESENCE_ONLY = TIME_COLUMNS | {"request_id"}  # checked for presence, dtype and nulls: no ranges, no PSI
MAX_CATEGORIES = 50  # a text column with more distinct training values is an identifier: its shape is compared
PSI_FLOOR = 1e-4  # share given to a bin empty on one side, so that PSI stays finite


@dataclass(frozen=True)
class FeatureCheckConfig:
    """Thresholds of the checks (PSI: 0.1 is a moderate shift, 0.2 the usual alarm)."""

    psi_threshold: float = 0.2
    max_out_of_range: float = 0.01
    max_null_change: float = 0.1
    range_margin: float = 0.1
    min_psi_values: int = 100
    """Online values a column needs before its PSI is judged: with n values over b bins, sampling alone
    gives a PSI near (b - 1) / n, so a handful of purchases would fail any threshold."""

    def __post_init__(self) -> None:
        for name in ("psi_threshold", "max_out_of_range", "max_null_change", "range_margin"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.min_psi_values, bool) or not isinstance(self.min_psi_values, int) \
                or self.min_psi_values < 1:
            raise ValueError(f"min_psi_values must be an integer >= 1, got {self.min_psi_values!r}")


@dataclass(frozen=True)
class Finding:
    """One check of one column: what was measured, against what, and whether it passed."""

    column: str
    check: str  # columns | dtype | nulls | range | psi
    passed: bool
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class FeatureCheckReport:
    """Every finding; the data may be trained on only when all passed."""

    training_rows: int
    online_rows: int
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.passed for f in self.findings)

    @property
    def failed(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.passed)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "training_rows": self.training_rows,
            "online_rows": self.online_rows,
            "failed_columns": sorted({f.column for f in self.failed}),
            "findings": [asdict(f) for f in self.findings],
        }


def read_log(uri: str | Path) -> pl.DataFrame:
    """A log with its own value types (JSONL, CSV or Parquet): the dtypes are part of what is checked."""
    path = resolve_uri(uri)
    if "://" not in path and not Path(path).is_file():
        raise DataFormatError(f"{path}: no such file")
    if "://" not in path and Path(path).stat().st_size == 0:
        raise DataFormatError(f"{path}: empty")
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            frame = pl.read_parquet(path)
        elif fmt == "csv":
            frame = pl.read_csv(path, infer_schema_length=10_000)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=None)
    except pl.exceptions.PolarsError as error:
        raise DataFormatError(f"{path}: cannot be read: {error}") from error
    if frame.height == 0:
        raise DataFormatError(f"{path}: empty")
    return frame


def check_features(
    training: pl.DataFrame, online: pl.DataFrame, config: FeatureCheckConfig | None = None
) -> FeatureCheckReport:
    """Compare ``online`` with ``training`` column by column (see the module's docstring)."""
    config = config or FeatureCheckConfig()
    findings: list[Finding] = []
    for column in training.columns:
        if column not in online.columns:
            findings.append(Finding(column, "columns", False, "in the training data but not in the online log"))
            continue
        findings.extend(_check_column(column, training[column], online[column], config))
    findings.extend(
        Finding(column, "columns", True, "only in the online log (not read by training)")
        for column in online.columns
        if column not in training.columns
    )
    return FeatureCheckReport(training.height, online.height, tuple(findings))


def _kind(dtype: pl.DataType) -> str:
    if dtype.is_numeric():
        return "number"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype in (pl.String, pl.Categorical, pl.Enum):
        return "text"
    if dtype == pl.Null:
        return "null"
    return str(dtype)


def _check_column(column: str, train: pl.Series, online: pl.Series, config: FeatureCheckConfig) -> Iterable[Finding]:
    train_kind, online_kind = _kind(train.dtype), _kind(online.dtype)
    if online_kind not in (train_kind, "null"):  # an all-null column is judged by the null check
        yield Finding(column, "dtype", False, f"{train_kind} ({train.dtype}) in training, {online_kind} "
                      f"({online.dtype}) online")
        return
    yield Finding(column, "dtype", True, f"{train_kind} on both sides")
    train_nulls, online_nulls = train.null_count() / len(train), online.null_count() / len(online)
    change = abs(online_nulls - train_nulls)
    yield Finding(column, "nulls", change <= config.max_null_change,
                  f"{train_nulls:.1%} missing in training, {online_nulls:.1%} online", change, config.max_null_change)
    train, online = train.drop_nulls(), online.drop_nulls()
    if column in PRESENCE_ONLY or train.is_empty() or online.is_empty() or online_kind == "null":
        return
    if train_kind == "number":
        yield _range_finding(column, train, online, config)
        edges = _quantile_edges(train)
        yield _psi_finding(column, "ten training-quantile bins", _binned(train, edges), _binned(online, edges), config)
    elif train_kind == "text" and train.n_unique() > MAX_CATEGORIES:
        yield _psi_finding(column, "identifier shapes", _shapes(train), _shapes(online), config)
    else:
        yield _psi_finding(column, "values", train.cast(pl.String), online.cast(pl.String), config)


def _range_finding(column: str, train: pl.Series, online: pl.Series, config: FeatureCheckConfig) -> Finding:
    low, high = train.min(), train.max()
    margin = (high - low) * config.range_margin
    outside = float(((online < low - margin) | (online > high + margin)).mean())
    return Finding(column, "range", outside <= config.max_out_of_range,
                   f"{outside:.1%} of online values outside the training range [{low}, {high}] widened by "
                   f"{config.range_margin:.0%} (online: [{online.min()}, {online.max()}])",
                   outside, config.max_out_of_range)


def _quantile_edges(values: pl.Series) -> list[float]:
    quantiles = [float(values.quantile(q / 10, interpolation="linear")) for q in range(1, 10)]
    return sorted(set(quantiles))


def _binned(values: pl.Series, edges: list[float]) -> pl.Series:
    """The bin of each value: how many edges lie below it."""
    return pl.Series(np.searchsorted(np.asarray(edges), values.cast(pl.Float64).to_numpy(), side="left"))


def _shapes(values: pl.Series) -> pl.Series:
    """``P00017`` → ``A99999``: letters as A, digits as 9, the rest kept."""
    return values.cast(pl.String).str.replace_all(r"\p{L}", "A").str.replace_all(r"\d", "9")


def population_stability_index(train: pl.Series, online: pl.Series) -> tuple[float, list[tuple[str, float, float]]]:
    """PSI of two samples of one categorical variable, and the categories that moved most (value, train, online)."""
    train_share = dict(zip(*_shares(train), strict=True))
    online_share = dict(zip(*_shares(online), strict=True))
    terms = []
    for category in train_share.keys() | online_share.keys():
        p, q = max(train_share.get(category, 0.0), PSI_FLOOR), max(online_share.get(category, 0.0), PSI_FLOOR)
        terms.append((category, (q - p) * math.log(q / p), train_share.get(category, 0.0),
                      online_share.get(category, 0.0)))
    terms.sort(key=lambda term: -term[1])
    return sum(term[1] for term in terms), [(str(c), p, q) for c, _, p, q in terms[:3]]


def _shares(values: pl.Series) -> tuple[list, list[float]]:
    counts = values.value_counts()
    total = counts["count"].sum()
    return counts[values.name].to_list(), [count / total for count in counts["count"].to_list()]


def _psi_finding(column: str, over: str, train: pl.Series, online: pl.Series, config: FeatureCheckConfig) -> Finding:
    if len(online) < config.min_psi_values:
        return Finding(column, "psi", True, f"not judged: {len(online)} online values, fewer than the "
                       f"{config.min_psi_values} a PSI needs")
    psi, moved = population_stability_index(train.rename("value"), online.rename("value"))
    movers = ", ".join(f"{value!r} {p:.1%}→{q:.1%}" for value, p, q in moved)
    return Finding(column, "psi", psi <= config.psi_threshold, f"PSI {psi:.3f} over {over}; most moved: {movers}",
                   psi, config.psi_threshold)
