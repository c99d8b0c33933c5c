"""Talking to ``recops_ensemble``: request tensors, response parsing, and the router's async client.

The request/response helpers work with both of tritonclient's protocols (``tritonclient.http``
and ``tritonclient.grpc`` share ``InferInput``'s interface), so tests and benchmarks can
compare HTTP and gRPC on the same bytes. :class:`TritonRecommender` is the router's upstream:
one persistent gRPC channel (tritonclient's asyncio client) per Triton endpoint, and
micro-batching: requests that arrive while the event loop is busy travel to Triton as the
rows of one request, so Triton's python steps and the router's gRPC stack pay once per
batch rather than once per user.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from recops.serving import contract as c


@dataclass(frozen=True)
class RowRequest:
    """One user's request, as the ensemble takes it."""

    user_id: str
    history: Sequence[str]
    k: int
    candidates: Sequence[str] | None = None


@dataclass(frozen=True)
class TritonAnswer:
    """The ensemble's answer for one user, best first."""

    item_ids: list[str]
    scores: np.ndarray
    click: np.ndarray
    like: np.ndarray


def _bytes_rows(rows: Sequence[Sequence[str]]) -> np.ndarray:
    # Rows of different lengths are padded with empty strings, which the models drop; an empty
    # row travels as one empty string.
    width = max(1, *(len(row) for row in rows))
    out = np.full((len(rows), width), b"", dtype=object)
    for i, row in enumerate(rows):
        out[i, : len(row)] = [v.encode() for v in row]
    return out


def batch_inputs(protocol: ModuleType, rows: Sequence[RowRequest]) -> list[Any]:
    """The ensemble's input tensors for several users, one row each (they must share k).

    ``protocol``: ``tritonclient.http``, ``tritonclient.grpc`` or ``tritonclient.grpc.aio``.
    """
    tensors: list[tuple[str, np.ndarray, str]] = [
        (c.USER_ID, np.array([[r.user_id.encode()] for r in rows], dtype=object), "BYTES"),
        (c.HISTORY, _bytes_rows([r.history for r in rows]), "BYTES"),
        (c.K, np.array([[r.k] for r in rows], dtype=np.int32), "INT32"),
    ]
    if any(r.candidates is not None for r in rows):
        tensors.append((c.CANDIDATES, _bytes_rows([r.candidates or () for r in rows]), "BYTES"))
    inputs = []
    for name, array, datatype in tensors:
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def request_inputs(
    protocol: ModuleType, user_id: str, history: Sequence[str], k: int, candidates: Sequence[str] | None = None
) -> list[Any]:
    """The ensemble's input tensors for one user."""
    return batch_inputs(protocol, [RowRequest(user_id, history, k, candidates)])


def parse_answers(result: Any) -> list[TritonAnswer]:
    """Every row of an ensemble result (``InferResult`` of either protocol)."""
    ids, scores = result.as_numpy(c.ITEM_IDS), result.as_numpy(c.SCORES)
    click, like = result.as_numpy(c.CLICK), result.as_numpy(c.LIKE)
    return [
        TritonAnswer([v.decode() for v in ids[row]], scores[row], click[row], like[row]) for row in range(len(ids))
    ]


def parse_answer(result: Any) -> TritonAnswer:
    """The first row of an ensemble result."""
    return parse_answers(result)[0]


def _client_message(error: Any) -> str:
    # Triton prefixes errors from ensemble steps with "in ensemble 'name', ": not the client's business.
    return re.sub(r"^in ensemble '[^']*', ", "", error.message() or str(error))


@dataclass
class _Pending:
    rows: list[RowRequest] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)


class TritonRecommender:
    """The router's upstream for one arm: Triton's ensemble over one persistent gRPC channel.

    Implements ``recops.serving.router.upstream.Recommender``. Triton's INVALID_ARGUMENT
    (unknown items, k out of range) becomes ``UpstreamBadRequest`` with Triton's reason;
    a missed deadline ``UpstreamTimeout``; anything else ``UpstreamError``.

    ``batch_rows`` > 1 turns on micro-batching: requests with the same k (and whether they
    carry candidates) that arrive in the same turn of the event loop are sent together, up
    to ``batch_rows`` per Triton request (capped at the ensemble's ``max_batch_size``, read
    from Triton on first use). Nothing waits on a timer, so a lone request leaves at once.
    """

    def __init__(self, url: str, model: str = c.ENSEMBLE, timeout_s: float = 1.0, batch_rows: int = 1) -> None:
        import tritonclient.grpc.aio as triton_aio

        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.batch_rows = batch_rows
        self._protocol = triton_aio
        self._channel: Any = None  # opened on first use: a gRPC aio channel belongs to a running loop
        self._pending: dict[tuple[int, bool], _Pending] = {}
        self._rows_checked = batch_rows == 1
        self._rows_check: asyncio.Future | None = None

    async def _check_rows(self) -> None:
        # Triton refuses a request with more rows than the model's max_batch_size: cap to it.
        config = await self._client.get_model_config(self.model, as_json=True)
        max_batch_size = int(config.get("config", {}).get("max_batch_size", 0))
        self.batch_rows = max(1, min(self.batch_rows, max_batch_size))
        self._rows_checked = True

    async def _ensure_rows_checked(self) -> None:
        # Every request arriving before the answer waits for the same check; a failed check is retried later.
        if self._rows_check is None:
            self._rows_check = asyncio.ensure_future(self._map_errors(self._check_rows()))
        check = self._rows_check
        try:
            await asyncio.shield(check)
        except Exception:
            if self._rows_check is check:
                self._rows_check = None
            raise

    @property
    def _client(self) -> Any:
        if self._channel is None:
            self._channel = self._protocol.InferenceServerClient(self.url)
        return self._channel

    async def recommend(self, user_id: str, history: list[str], k: int, candidates: list[str] | None) -> Any:
        from recops.serving.router.upstream import Ranked

        row = RowRequest(user_id, history, k, candidates)
        if not self._rows_checked:
            await self._ensure_rows_checked()
        if self.batch_rows == 1:
            (answer,) = await self._infer([row])
        else:
            answer = await self._enqueue(row)
        return Ranked(answer.item_ids, answer.scores.tolist(), answer.click.tolist(), answer.like.tolist())

    def _enqueue(self, row: RowRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        key = (row.k, row.candidates is not None)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
            loop.call_soon(self._flush, key)  # after every request already read this turn has queued
        future = loop.create_future()
        pending.rows.append(row)
        pending.futures.append(future)
        if len(pending.rows) >= self.batch_rows:
            self._flush(key)
        return future

    def _flush(self, key: tuple[int, bool]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None and pending.rows:
            asyncio.get_running_loop().create_task(self._send(pending))

    async def _send(self, pending: _Pending) -> None:
        try:
            answers = await self._infer(pending.rows)
        except Exception as error:
            from recops.serving.router.upstream import UpstreamBadRequest

            if isinstance(error, UpstreamBadRequest) and len(pending.rows) > 1:
                # One bad row fails the whole Triton request: ask again row by row, so each
                # request gets its own answer or its own reason.
                for row, future in zip(pending.rows, pending.futures, strict=True):
                    self._settle_alone(row, future)
                return
            for future in pending.futures:
                if not future.done():
                    future.set_exception(error)
            return
        for future, answer in zip(pending.futures, answers, strict=True):
            if not future.done():
                future.set_result(answer)

    def _settle_alone(self, row: RowRequest, future: asyncio.Future) -> None:
        async def one() -> None:
            try:
                (answer,) = await self._infer([row])
            except Exception as error:
                if not future.done():
                    future.set_exception(error)
                return
            if not future.done():
                future.set_result(answer)

        asyncio.get_running_loop().create_task(one())

    async def _infer(self, rows: Sequence[RowRequest]) -> list[TritonAnswer]:
        call = self._client.infer(self.model, batch_inputs(self._protocol, rows), client_timeout=self.timeout_s)
        return parse_answers(await self._map_errors(call))

    async def _map_errors(self, call: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        from recops.serving.router.upstream import UpstreamBadRequest, UpstreamError, UpstreamTimeout

        try:
            return await call
        except InferenceServerException as error:
            status = str(error.status() or "")
            if status.endswith("INVALID_ARGUMENT"):
                raise UpstreamBadRequest(_client_message(error)) from None
            if status.endswith("DEADLINE_EXCEEDED"):
                raise UpstreamTimeout(f"Triton {self.url} did not answer within {self.timeout_s:g} s") from None
            raise UpstreamError(f"Triton {self.url}: {status or 'error'}: {_client_message(error)}") from None

    async def ready(self) -> bool:
        """Whether Triton says the ensemble is ready (False when unreachable)."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_model_ready(self.model))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
