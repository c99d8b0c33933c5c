"""``recops_ranker``: user vectors, top-k retrieval and the click/like heads for a whole batch.

Every request Triton's dynamic batcher hands over is ranked in one pass through
``recops.kernels``. On a ``KIND_GPU`` instance the towers and the item index live on that
instance's GPU and go through the CUDA kernels when they are built (the Triton image builds them);
the log says which. A failure while ranking answers that batch's requests with an error and leaves
the model serving.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend

from recops.kernels import cuda as cuda_kernels
from recops.serving import contract as c
from recops.serving import repository as r
from recops.serving.ranker import RankedIndices, RankInput, RankRequestError, Scorer
from recops.serving.triton_models._backend import array, artifact_dir, bad_request, respond, server_error
from recops.training.export import load_model


def _rank_inputs(request: Any) -> list[RankInput]:
    history, mask = array(request, r.HISTORY_ITEMS), array(request, r.HISTORY_MASK)
    ks, pools = array(request, r.K_OUT).reshape(-1), array(request, r.CANDIDATE_INDEX)
    inputs = []
    for row in range(history.shape[0]):
        pool = pools[row][pools[row] >= 0]
        inputs.append(RankInput(history[row], mask[row], int(ks[row]), pool if len(pool) else None))
    return inputs


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            # One thread per CPU instance: batches are small, and OpenMP threads spinning beside
            # Triton's own threads and the other steps' stubs cost more than they bring.
            torch.set_num_threads(1)
        self.scorer = Scorer(load_model(artifact_dir(args), with_backbone=False), device=device)
        if device != "cpu":
            pb_utils.Logger.log_info(f"recops_ranker on {device}: {cuda_kernels.describe()}")

    def execute(self, requests: list) -> list:
        per_request = [_rank_inputs(request) for request in requests]
        try:
            answers = self.scorer.rank([item for inputs in per_request for item in inputs])
        except Exception as error:  # any failure: these requests get it, the model keeps serving
            pb_utils.Logger.log_error(f"recops_ranker: ranking a batch failed: {error!r}")
            return [server_error(f"ranking failed: {error}") for _ in requests]
        responses, start = [], 0
        for inputs in per_request:
            mine, start = answers[start : start + len(inputs)], start + len(inputs)
            errors = [a for a in mine if isinstance(a, RankRequestError)]
            if errors:
                responses.append(bad_request(str(errors[0])))
                continue
            ranked = [a for a in mine if isinstance(a, RankedIndices)]
            responses.append(respond({
                r.TOP_INDEX: np.stack([a.items for a in ranked]),
                c.SCORES: np.stack([a.scores for a in ranked]).astype(np.float32),
                c.CLICK: np.stack([a.click for a in ranked]).astype(np.float32),
                c.LIKE: np.stack([a.like for a in ranked]).astype(np.float32),
            }))
        return responses
