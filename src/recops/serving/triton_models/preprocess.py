"""``recops_preprocess``: request item ids → padded history indices, with the training feature code.

Loading fails (and so does Triton's start) when the artifact's feature-schema hash
differs from this code's. A request with unknown items, an oversized history, k out
of range or an empty candidate pool gets an INVALID_ARG error; the model stays up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recops.serving import contract as c
from recops.serving import repository as r
from recops.serving.ranker import NO_CANDIDATES, Catalog, RankRequestError
from recops.serving.triton_models._backend import answer_each, array, artifact_dir, respond, strings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.catalog = Catalog.load(artifact_dir(args))

    def _answer(self, request: Any) -> Any:
        histories = strings(request, c.HISTORY) or []
        ks = array(request, c.K).reshape(-1)
        candidates = strings(request, c.CANDIDATES)
        if len(set(ks.tolist())) > 1:
            raise RankRequestError("K must be the same for every row of a request")
        inputs = []
        for row, history in enumerate(histories):
            pool = None if candidates is None else candidates[row]
            try:
                inputs.append(self.catalog.features(history, int(ks[row]), pool))
            except RankRequestError as error:
                where = f"row {row}: " if len(histories) > 1 else ""
                raise RankRequestError(f"{where}{error}") from None
        width = max((len(i.candidates) for i in inputs if i.candidates is not None), default=1)
        pools = np.full((len(inputs), width), -1, dtype=np.int64)
        for row, item in enumerate(inputs):
            pool = NO_CANDIDATES if item.candidates is None else item.candidates
            pools[row, : len(pool)] = pool
        return respond({
            r.HISTORY_ITEMS: np.stack([i.history for i in inputs]),
            r.HISTORY_MASK: np.stack([i.mask for i in inputs]),
            r.K_OUT: ks.astype(np.int32).reshape(-1, 1),
            r.CANDIDATE_INDEX: pools,
        })

    def execute(self, requests: list) -> list:
        return answer_each(requests, self._answer, RankRequestError)
