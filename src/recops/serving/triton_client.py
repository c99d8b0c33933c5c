"""Talking to ``recops_ensemble``: request tensors, response parsing, and the router's async client.

The request/response helpers work with both of tritonclient's protocols (``tritonclient.http``
and ``tritonclient.grpc`` share ``InferInput``'s interface), so tests and benchmarks can
compare HTTP and gRPC on the same bytes. :class:`TritonRecommender` is the router's upstream:
one persistent gRPC channel (tritonclient's asyncio client) per Triton endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from recops.serving import contract as c


@dataclass(frozen=True)
class TritonAnswer:
    """The ensemble's answer for one user, best first."""

    item_ids: list[str]
    scores: np.ndarray
    click: np.ndarray
    like: np.ndarray


def _bytes_row(values: Sequence[str]) -> np.ndarray:
    # An empty list travels as one empty string: the models drop empty strings.
    return np.array([[v.encode() for v in values] or [b""]], dtype=object)


def request_inputs(
    protocol: ModuleType, user_id: str, history: Sequence[str], k: int, candidates: Sequence[str] | None = None
) -> list[Any]:
    """The ensemble's input tensors for one user (``protocol``: ``tritonclient.http`` or ``.grpc``)."""
    tensors: list[tuple[str, np.ndarray, str]] = [
        (c.USER_ID, np.array([[user_id.encode()]], dtype=object), "BYTES"),
        (c.HISTORY, _bytes_row(history), "BYTES"),
        (c.K, np.array([[k]], dtype=np.int32), "INT32"),
    ]
    if candidates is not None:
        tensors.append((c.CANDIDATES, _bytes_row(candidates), "BYTES"))
    inputs = []
    for name, array, datatype in tensors:
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def parse_answer(result: Any) -> TritonAnswer:
    """The first row of an ensemble result (``InferResult`` of either protocol)."""
    return TritonAnswer(
        item_ids=[v.decode() for v in result.as_numpy(c.ITEM_IDS)[0]],
        scores=result.as_numpy(c.SCORES)[0],
        click=result.as_numpy(c.CLICK)[0],
        like=result.as_numpy(c.LIKE)[0],
    )


def _client_message(error: Any) -> str:
    # Triton prefixes errors from ensemble steps with "in ensemble 'name', ": not the client's business.
    return re.sub(r"^in ensemble '[^']*', ", "", error.message() or str(error))


class TritonRecommender:
    """The router's upstream for one arm: Triton's ensemble over one persistent gRPC channel.

    Implements ``recops.serving.router.upstream.Recommender``. Triton's INVALID_ARGUMENT
    (unknown items, k out of range) becomes ``UpstreamBadRequest`` with Triton's reason;
    a missed deadline ``UpstreamTimeout``; anything else ``UpstreamError``.
    """

    def __init__(self, url: str, model: str = c.ENSEMBLE, timeout_s: float = 1.0) -> None:
        import tritonclient.grpc.aio as triton_aio

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._protocol = triton_aio
        self._client = triton_aio.InferenceServerClient(url)

    async def recommend(self, user_id: str, history: list[str], k: int, candidates: list[str] | None) -> Any:
        from tritonclient.utils import InferenceServerException

        from recops.serving.router.upstream import Ranked, UpstreamBadRequest, UpstreamError, UpstreamTimeout

        inputs = request_inputs(self._protocol, user_id, history, k, candidates)
        try:
            result = await self._client.infer(self.model, inputs, client_timeout=self.timeout_s)
        except InferenceServerException as error:
            status = str(error.status() or "")
            if status.endswith("INVALID_ARGUMENT"):
                raise UpstreamBadRequest(_client_message(error)) from None
            if status.endswith("DEADLINE_EXCEEDED"):
                raise UpstreamTimeout(f"Triton {self.url} did not answer within {self.timeout_s:g} s") from None
            raise UpstreamError(f"Triton {self.url}: {status or 'error'}: {_client_message(error)}") from None
        answer = parse_answer(result)
        return Ranked(answer.item_ids, answer.scores.tolist(), answer.click.tolist(), answer.like.tolist())

    async def ready(self) -> bool:
        """Whether Triton says the ensemble is ready (False when unreachable)."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_model_ready(self.model, headers=None))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()
