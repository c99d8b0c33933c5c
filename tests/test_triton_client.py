"""The router's Triton upstream against a real Triton: micro-batched answers, errors per request."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import numpy as np
import pytest

from recops.serving.contract import ENSEMBLE
from recops.serving.ranker import Ranker
from recops.serving.router.upstream import UpstreamBadRequest, UpstreamError, UpstreamTimeout
from recops.serving.triton_client import TritonRecommender
from recops.serving.triton_server import free_port

pytestmark = pytest.mark.slow


async def _ask(upstream: TritonRecommender, requests):
    try:
        return await asyncio.gather(*(upstream.recommend(*r) for r in requests), return_exceptions=True)
    finally:
        await upstream.close()


def _ensemble_counts(server) -> tuple[float, float]:
    """(Triton requests, rows inferred) of the ensemble so far, from Triton's metrics endpoint."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    values = {}
    for name in ("nv_inference_request_success", "nv_inference_count"):
        match = re.search(rf'^{name}{{model="{ENSEMBLE}",version="1"}} (\S+)$', text, re.MULTILINE)
        values[name] = float(match.group(1))
    return values["nv_inference_request_success"], values["nv_inference_count"]


@pytest.mark.parametrize("batch_rows", [1, 8])
def test_concurrent_requests_get_their_own_answers_and_errors(tiny_triton, tiny_model, batch_rows):
    ids = tiny_model[0].items["item_id"].to_list()
    before = _ensemble_counts(tiny_triton)
    requests_ = [
        (f"U{i}", ids[i % 60 : i % 60 + i % 4], 3 + i % 2, ids[:20] if i % 5 == 0 else None) for i in range(40)
    ]
    requests_[7] = ("U7", ["no-such-item"], 3, None)
    answers = asyncio.run(_ask(TritonRecommender(tiny_triton.grpc_url, batch_rows=batch_rows), requests_))
    ranker = Ranker.load(tiny_model[2])
    for request, answer in zip(requests_, answers, strict=True):
        if request[1] == ["no-such-item"]:
            assert isinstance(answer, UpstreamBadRequest) and "unknown item ids: no-such-item" in str(answer)
            continue
        (expected,) = ranker.recommend([request[1]], k=request[2], candidates=request[3])
        assert answer.item_ids == expected.item_ids
        assert np.allclose(answer.scores, expected.scores, atol=1e-5)
    requests, rows = (a - b for a, b in zip(_ensemble_counts(tiny_triton), before, strict=True))
    assert rows == len(requests_) - 1  # every good request answered once, the bad one refused
    assert requests == rows if batch_rows == 1 else requests < rows


@pytest.mark.parametrize(("batch_rows", "triton_requests"), [(8, 4), (1000, 2)])
def test_requests_arriving_together_share_triton_requests(tiny_triton, tiny_model, batch_rows, triton_requests):
    ids = tiny_model[0].items["item_id"].to_list()
    before = _ensemble_counts(tiny_triton)
    requests_ = [(f"U{i}", ids[i : i + 3], 5, None) for i in range(32)]
    answers = asyncio.run(_ask(TritonRecommender(tiny_triton.grpc_url, batch_rows=batch_rows), requests_))
    assert all(len(a.item_ids) == 5 for a in answers)
    requests, rows = (a - b for a, b in zip(_ensemble_counts(tiny_triton), before, strict=True))
    # 32 users in one turn of the loop: rows of 8, or of 16 (the tiny model's max_batch_size caps 1000).
    assert (requests, rows) == (triton_requests, 32)


def test_ready_and_failures_are_named(tiny_triton):
    async def scenario():
        good = TritonRecommender(tiny_triton.grpc_url)
        assert await good.ready()
        await good.close()
        missing = TritonRecommender(tiny_triton.grpc_url, model="no_such_model")
        assert not await missing.ready()
        with pytest.raises(UpstreamError, match=r"no_such_model|unknown model"):
            await missing.recommend("u", [], 3, None)
        await missing.close()
        down = TritonRecommender(f"127.0.0.1:{free_port()}", timeout_s=2)
        assert not await down.ready()
        with pytest.raises(UpstreamError, match="UNAVAILABLE"):
            await down.recommend("u", [], 3, None)
        await down.close()
        hurried = TritonRecommender(tiny_triton.grpc_url, timeout_s=1e-5)
        with pytest.raises(UpstreamTimeout, match="did not answer within"):
            await hurried.recommend("u", [], 3, None)
        await hurried.close()

    asyncio.run(scenario())
