"""Reading event logs and item catalogs from JSONL, CSV or Parquet.

Reading never drops a row: every line of the file comes back, as strings, with a
``malformed`` flag where the line could not be parsed. Typing, validation and
dropping happen in :mod:`recops.data.cleaning`, which counts each drop.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recops.data.schema import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    OPTIONAL_EVENT_COLUMNS,
    OPTIONAL_ITEM_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    REQUIRED_ITEM_COLUMNS,
)

# A valid line is one JSON object; this cheap check rejects arrays, scalars and
# truncated lines before the vectorised decoder, which fails a whole chunk on one bad line.
_OBJECT_LINE = r"^\s*\{.*\}\s*$"
_CHUNK = 65_536
# Where pvc://CLAIM/PATH is mounted inside recops pods (the operator mounts claims there).
PVC_ROOT_ENV = "RECOPS_PVC_ROOT"


class DataFormatError(ValueError):
    """A file is not what it was given as (names the file and what was expected)."""


def resolve_uri(uri: str | os.PathLike[str]) -> str:
    """Map a data URI to something polars can open.

    ``file://PATH`` and plain paths are local files; ``pvc://CLAIM/PATH`` is the
    path under the claim's mount (``$RECOPS_PVC_ROOT/CLAIM/PATH``, default
    ``/mnt/pvc``); ``s3://`` and other object-store URIs go to polars' own
    cloud readers unchanged (credentials from the usual AWS environment).
    """
    text = os.fspath(uri)
    if text.startswith("file://"):
        return text.removeprefix("file://")
    if text.startswith("pvc://"):
        root = os.environ.get(PVC_ROOT_ENV, "/mnt/pvc")
        return str(Path(root) / text.removeprefix("pvc://"))
    if "://" in text and not text.startswith(("s3://", "gs://", "az://", "abfs://", "https://")):
        raise DataFormatError(f"{text}: unsupported URI scheme (use file://, pvc://, s3://, gs:// or az://)")
    return text


@dataclass(frozen=True)
class KafkaSource:
    """A feedback topic named by a ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?group=GROUP]`` URI."""

    bootstrap_servers: str
    topic: str
    group: str | None = None


def parse_kafka_uri(uri: str) -> KafkaSource:
    """Parse a feedback URI of the Kafka transport.

    Raises:
        ValueError: naming what is missing (the address or the topic) or not understood.
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if parts.scheme != "kafka":
        raise ValueError(f"{uri!r}: expected kafka://HOST:PORT/TOPIC[?group=GROUP]")
    topic = parts.path.strip("/")
    if not parts.netloc or not topic or "/" in topic:
        raise ValueError(f"{uri!r}: expected kafka://HOST:PORT/TOPIC[?group=GROUP] (the broker and one topic)")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"group"})
    if unknown:
        raise ValueError(f"{uri!r}: unknown parameter {unknown[0]!r} (only 'group')")
    return KafkaSource(parts.netloc, topic, (query.get("group") or [None])[0])


def file_format(path: str) -> str:
    """``jsonl``, ``csv`` or ``parquet``, from the file's suffix (``.gz`` allowed)."""
    lowered = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if lowered.endswith(suffix) or lowered.endswith(suffix + ".gz"):
            return fmt
    raise DataFormatError(f"{path}: unknown file type (expected .jsonl, .ndjson, .csv or .parquet)")


def _read_lines(path: str) -> pl.Series:
    """Every non-blank line of a text file, as one string column."""
    frame = pl.read_csv(
        path,
        has_header=False,
        separator="\x1f",  # a byte that never occurs in JSON text, so each line is one field
        quote_char=None,
        schema={"line": pl.String},
        truncate_ragged_lines=True,
    )
    return frame["line"].filter(frame["line"].str.strip_chars().str.len_bytes() > 0)


def _decode_chunk(lines: pl.Series, columns: tuple[str, ...]) -> pl.DataFrame:
    dtype = pl.Struct({name: pl.String for name in columns})
    try:
        return lines.str.json_decode(dtype).struct.unnest().with_columns(pl.lit(False).alias("malformed"))
    except pl.exceptions.PolarsError:
        # Rare: a line that looks like an object but is not valid JSON. Decode this chunk
        # line by line so only the bad lines are marked.
        rows = [_decode_line(line, columns) for line in lines.to_list()]
        return pl.DataFrame(rows, schema={**{c: pl.String for c in columns}, "malformed": pl.Boolean})


def _decode_line(line: str, columns: tuple[str, ...]) -> dict[str, str | bool | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return {**dict.fromkeys(columns), "malformed": True}
    row: dict[str, str | bool | None] = {
        c: None if obj.get(c) is None else _as_text(obj[c]) for c in columns
    }
    row["malformed"] = False
    return row


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _read_jsonl(path: str, columns: tuple[str, ...]) -> pl.DataFrame:
    # Fast path: a clean file parses in one multi-threaded pass. Any bad line makes polars
    # refuse the whole file; then every line is checked on its own (the slow, exact path).
    try:
        frame = pl.read_ndjson(path, schema={c: pl.String for c in columns}, ignore_errors=False)
        return frame.with_columns(pl.lit(False).alias("malformed"))
    except pl.exceptions.PolarsError:
        pass
    lines = _read_lines(path)
    is_object = lines.str.contains(_OBJECT_LINE)
    good = lines.filter(is_object)
    parts = [_decode_chunk(good.slice(start, _CHUNK), columns) for start in range(0, len(good), _CHUNK)]
    n_bad = len(lines) - len(good)
    if n_bad:
        parts.append(
            pl.DataFrame({c: [None] * n_bad for c in columns}, schema={c: pl.String for c in columns})
            .with_columns(pl.lit(True).alias("malformed"))
        )
    if not parts:
        return pl.DataFrame(schema={**{c: pl.String for c in columns}, "malformed": pl.Boolean})
    return pl.concat(parts, how="vertical")


def _read_table(path: str, fmt: str, columns: tuple[str, ...]) -> pl.DataFrame:
    is_csv = fmt == "csv"
    frame = pl.read_csv(path, infer_schema=False, truncate_ragged_lines=True) if is_csv else pl.read_parquet(path)
    present = [c for c in columns if c in frame.columns]
    frame = frame.select([pl.col(c).cast(pl.String) for c in present])
    missing = [c for c in columns if c not in frame.columns]
    return frame.with_columns(
        *[pl.lit(None, dtype=pl.String).alias(c) for c in missing], pl.lit(False).alias("malformed")
    ).select([*columns, "malformed"])


def read_raw(uri: str | os.PathLike[str], columns: tuple[str, ...]) -> pl.DataFrame:
    """Read every record of a JSONL/CSV/Parquet file as strings plus a ``malformed`` flag."""
    path = resolve_uri(uri)
    fmt = file_format(path)
    if "://" not in path and not Path(path).is_file():
        raise DataFormatError(f"{path}: no such file")
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, columns)
        return _read_table(path, fmt, columns)
    except pl.exceptions.PolarsError as error:
        raise DataFormatError(f"{path}: cannot be read as {fmt}: {error}") from error


def _check_contract(raw: pl.DataFrame, path: str, required: tuple[str, ...], what: str) -> None:
    """Fail when a file is not this kind of file at all (as opposed to having some bad rows)."""
    if raw.height == 0:
        raise DataFormatError(f"{path}: empty; expected {what} with columns {', '.join(required)}")
    parsed = raw.filter(~pl.col("malformed"))
    usable = parsed.filter(pl.all_horizontal(pl.col(c).is_not_null() for c in required)).height
    if usable == 0:
        present = [c for c in raw.columns if c != "malformed" and parsed[c].null_count() < parsed.height]
        raise DataFormatError(
            f"{path}: not {what}: expected columns {', '.join(required)}; "
            f"no record has them all (columns found: {', '.join(present) or 'none'}; "
            f"{raw.height - parsed.height} of {raw.height} lines unparseable)"
        )


def read_events(uri: str | os.PathLike[str]) -> pl.DataFrame:
    """Read an event log: all records as strings, ``malformed`` marking unparseable lines.

    Raises :class:`DataFormatError` when the file is not an event log at all.
    """
    columns = REQUIRED_EVENT_COLUMNS + OPTIONAL_EVENT_COLUMNS
    raw = read_raw(uri, columns)
    _check_contract(raw, resolve_uri(uri), REQUIRED_EVENT_COLUMNS, "an event log")
    return raw


def read_items(uri: str | os.PathLike[str]) -> pl.DataFrame:
    """Read an item catalog into its typed schema; rows without an item_id are dropped and counted.

    Raises :class:`DataFormatError` when the file is not a catalog at all.
    """
    path = resolve_uri(uri)
    raw = read_raw(uri, REQUIRED_ITEM_COLUMNS + OPTIONAL_ITEM_COLUMNS)
    _check_contract(raw, path, ("item_id", "title"), "an item catalog")
    return typed_items(raw)


def typed_items(raw: pl.DataFrame) -> pl.DataFrame:
    """Cast a catalog to :data:`ITEM_SCHEMA`, keeping one row per item_id (the last)."""
    frame = raw.filter(~pl.col("malformed") & pl.col("item_id").is_not_null()) if "malformed" in raw else raw
    for column in ITEM_SCHEMA:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None).alias(column))
    return (
        frame.select([pl.col(c).cast(dtype, strict=False) for c, dtype in ITEM_SCHEMA.items()])
        .unique(subset="item_id", keep="last", maintain_order=True)
    )


def write_events(events: pl.DataFrame, uri: str | os.PathLike[str]) -> None:
    """Write an event log as JSONL, CSV or Parquet (chosen by the file's suffix)."""
    _write(events.select([c for c in EVENT_SCHEMA if c in events.columns]), resolve_uri(uri))


def write_items(items: pl.DataFrame, uri: str | os.PathLike[str]) -> None:
    """Write an item catalog as JSONL, CSV or Parquet (chosen by the file's suffix)."""
    _write(items.select([c for c in ITEM_SCHEMA if c in items.columns]), resolve_uri(uri))


def _write(frame: pl.DataFrame, path: str) -> None:
    fmt = file_format(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        frame.write_ndjson(path)
    elif fmt == "csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
