"""What the router needs from a recommender upstream, and the in-process one.

An upstream answers one user's request with ranked item ids and their scores. Two implementations:
:class:`InProcessRecommender` (the exported model loaded into the router process: local development
and tests) and ``recops.serving.triton_client.TritonRecommender`` (Triton's ``recops_ensemble`` over
gRPC: production). Both raise the errors below, so the router maps them to HTTP statuses the same way:

* :class:`UpstreamBadRequest` — the upstream refused the request (unknown item ids, k larger than the
  catalog): the client's fault, answered 422 with the upstream's message;
* :class:`UpstreamTimeout` — no answer within the timeout: 504;
* :class:`UpstreamError` (any other) — the upstream failed or is unreachable: 502.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from recops.serving.ranker import Ranker


class UpstreamError(Exception):
    """The upstream failed or could not be reached (the base of the upstream errors)."""


class UpstreamBadRequest(UpstreamError):
    """The upstream refused the request as invalid; the message says why and is shown to the client."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within its timeout."""


@dataclass(slots=True)
class Ranked:
    """One user's recommendations, best first: item ids and, per item, score and click/like probabilities.

    Plain lists of Python floats (``ndarray.tolist()``): the router encodes them straight to JSON.
    """

    item_ids: list[str]
    scores: list[float]
    click: list[float]
    like: list[float]


@runtime_checkable
class Recommender(Protocol):
    """A recommender upstream of one arm. Implementations must be safe to call concurrently."""

    async def recommend(self, user_id: str, history: list[str], k: int, candidates: list[str] | None) -> Ranked:
        """Top-``k`` items for a user with this history (oldest first), optionally only from ``candidates``.

        Raises:
            UpstreamBadRequest: the request is invalid for this model (unknown items, k too large).
            UpstreamTimeout: no answer within the upstream's timeout.
            UpstreamError: any other failure.
        """
        ...

    async def ready(self) -> bool:
        """Whether the upstream can answer now (cheap; called by ``/readyz``)."""
        ...

    async def close(self) -> None:
        """Release connections or memory; no call is made after this."""
        ...


class InProcessRecommender:
    """An exported model directory served inside the router process (``model: <dir>`` in the config).

    The torch call is synchronous, so it runs on one dedicated thread: the event loop stays free and
    concurrent requests queue instead of oversubscribing the CPU cores.
    """

    def __init__(self, ranker: Ranker, timeout_s: float) -> None:
        self.ranker = ranker
        self.timeout_s = timeout_s
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="recops-ranker")

    @classmethod
    def load(cls, model_dir: Path, timeout_s: float) -> InProcessRecommender:
        """Load a model directory (slow: seconds; call it off the event loop)."""
        from recops.serving.ranker import Ranker  # torch is imported only when an arm serves in-process

        return cls(Ranker.load(model_dir), timeout_s)

    def _recommend(self, history: list[str], k: int, candidates: list[str] | None) -> Ranked:
        from recops.serving.ranker import RankRequestError

        try:
            (answer,) = self.ranker.recommend([history], k, candidates)
        except RankRequestError as error:
            # The ranker names the first history "history[0]"; the router's request has only one.
            raise UpstreamBadRequest(str(error).replace("history[0]", "history", 1)) from None
        except Exception as error:
            raise UpstreamError(f"in-process model failed: {type(error).__name__}: {error}") from error
        return Ranked(answer.item_ids, answer.scores.tolist(), answer.click.tolist(), answer.like.tolist())

    async def recommend(self, user_id: str, history: list[str], k: int, candidates: list[str] | None) -> Ranked:
        executor = self._executor
        if executor is None:
            raise UpstreamError("in-process model is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await loop.run_in_executor(executor, self._recommend, history, k, candidates)
        except TimeoutError:
            raise UpstreamTimeout(f"in-process model did not answer within {self.timeout_s:g} s") from None
        except RuntimeError as error:  # "cannot schedule new futures after shutdown": closed by a reload
            raise UpstreamError(f"in-process model unavailable: {error}") from None

    async def ready(self) -> bool:
        return self._executor is not None

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Work already queued still runs (cancelling it would cancel the awaiting requests); new calls fail.
            executor.shutdown(wait=False)
