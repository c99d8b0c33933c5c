"""`recops check-features`: a retrain is refused when the online log no longer matches the training data,
with a report naming the columns (the seed's silent 27% drop); a matching log passes."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from recops.cli import app
from recops.data.feature_check import FeatureCheckConfig, check_features, population_stability_index
from recops.data.io import write_events
from recops.data.synthetic import SyntheticConfig, generate

runner = CliRunner()


@pytest.fixture(scope="module")
def halves() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The synthetic shop's log cut in two at random: the same data, so every check must pass."""
    events = generate(SyntheticConfig()).events
    events = events.with_columns(pl.Series("half", [i % 2 for i in range(events.height)]).shuffle(seed=1))
    return events.filter(pl.col("half") == 0).drop("half"), events.filter(pl.col("half") == 1).drop("half")


def failed_columns(training: pl.DataFrame, online: pl.DataFrame) -> dict[str, set[str]]:
    report = check_features(training, online)
    failed: dict[str, set[str]] = {}
    for finding in report.failed:
        failed.setdefault(finding.column, set()).add(finding.check)
    return failed


def test_the_same_data_passes_every_check(halves):
    training, online = halves
    report = check_features(training, online)
    assert report.ok, [f for f in report.failed]
    checked = {(f.column, f.check) for f in report.findings}
    assert {("event", "psi"), ("item_id", "psi"), ("device", "psi"), ("timestamp", "dtype")} <= checked
    assert ("timestamp", "psi") not in checked  # time moves forward: presence, dtype and nulls only


@pytest.mark.parametrize(
    ("name", "change", "column", "check"),
    [
        ("device renamed", lambda f: f.with_columns(pl.col("device").str.to_lowercase().str.replace(r"\d.*", "")),
         "device", "psi"),
        ("item ids lost their prefix", lambda f: f.with_columns(pl.col("item_id").str.replace(r"^\D+0*", "")),
         "item_id", "psi"),
        ("timestamps as text", lambda f: f.with_columns(pl.col("timestamp").cast(pl.String)), "timestamp", "dtype"),
        ("prices in cents", lambda f: f.with_columns(pl.col("value") * 100), "value", "range"),
        ("column dropped", lambda f: f.drop("device"), "device", "columns"),
        ("column emptied", lambda f: f.with_columns(pl.lit(None, dtype=pl.String).alias("device")), "device", "nulls"),
        ("only impressions logged", lambda f: f.filter(pl.col("event") == "impression").vstack(
            f.filter(pl.col("event") != "impression").head(5)), "event", "psi"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_mismatch_is_named_by_column_and_check(halves, name, change, column, check):
    training, online = halves
    failed = failed_columns(training, change(online))
    assert check in failed.get(column, set()), failed
    assert set(failed) == {column}, f"{name}: only {column} differs, but {failed}"


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    same = pl.Series("value", ["a", "b"] * 50)
    assert population_stability_index(same, same)[0] == pytest.approx(0.0)
    mild = pl.Series("value", ["a"] * 55 + ["b"] * 45)
    strong = pl.Series("value", ["a"] * 90 + ["b"] * 10)
    assert 0 < population_stability_index(same, mild)[0] < 0.1 < population_stability_index(same, strong)[0]
    psi, moved = population_stability_index(same, pl.Series("value", ["a"] * 50 + ["c"] * 50))
    assert psi > 1 and {value for value, _, _ in moved} >= {"b", "c"}


def test_psi_is_judged_only_with_enough_online_values():
    """A few purchases cannot show a shift (sampling alone gives PSI ~ bins / n): not judged, never failed."""
    training = pl.DataFrame({"value": [float(v % 50) for v in range(1000)]})
    skewed = pl.DataFrame({"value": [7.0] * 200})
    few = check_features(training, skewed.head(20))
    finding = next(f for f in few.findings if f.check == "psi")
    assert few.ok and finding.detail == "not judged: 20 online values, fewer than the 100 a PSI needs"
    assert {(f.column, f.check) for f in check_features(training, skewed).failed} == {("value", "psi")}
    assert not check_features(training, skewed.head(20), FeatureCheckConfig(min_psi_values=10)).ok
    with pytest.raises(ValueError, match="min_psi_values must be an integer >= 1, got 0"):
        FeatureCheckConfig(min_psi_values=0)


@pytest.mark.parametrize("field", ["psi_threshold", "max_out_of_range", "max_null_change", "range_margin"])
def test_thresholds_must_be_finite_and_not_negative(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0, got -1"):
        FeatureCheckConfig(**{field: -1})


def test_the_cli_refuses_naming_the_columns_and_writes_the_report(halves, tmp_path):
    training, online = halves
    write_events(training, tmp_path / "training.parquet")
    online.with_columns(pl.col("device").str.to_uppercase()).write_ndjson(tmp_path / "feedback.jsonl")
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["check-features", "--training", str(tmp_path / "training.parquet"),
                                 "--online", str(tmp_path / "feedback.jsonl"), "--report", str(report)])
    assert result.exit_code == 1, result.output
    assert "refusing to train: the online log differs from the training data in device" in result.output
    written = json.loads(report.read_text())
    assert written["ok"] is False and written["failed_columns"] == ["device"]

    online.write_ndjson(tmp_path / "feedback.jsonl")
    result = runner.invoke(app, ["check-features", "--training", str(tmp_path / "training.parquet"),
                                 "--online", str(tmp_path / "feedback.jsonl")])
    assert result.exit_code == 0, result.output
    assert f"the online log ({online.height} rows) matches the training data" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--online", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--online", "events.txt"], "events.txt: unknown file type"),
        (["--online", "empty.jsonl"], "empty.jsonl: empty"),
        (["--online", "events.parquet", "--psi-threshold", "-0.5"], "psi_threshold must be a finite number >= 0"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    events = generate(SyntheticConfig()).events.head(200)
    write_events(events, tmp_path / "events.parquet")
    (tmp_path / "events.txt").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    result = runner.invoke(app, ["check-features", "--training", "events.parquet", *arguments])
    assert result.exit_code == 2 and message in result.output, result.output
