"""Shared fixtures: small datasets made in code (no downloads), and the ML-100K location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def movielens_dir() -> Path | None:
    """ML-100K folder: $RECOPS_ML100K_DIR, else ../shared/data/ml-100k beside the checkout."""
    candidate = Path(os.environ.get("RECOPS_ML100K_DIR", REPO.parent / "shared" / "data" / "ml-100k"))
    return candidate if (candidate / "u.data").is_file() else None


@pytest.fixture(scope="session")
def ml100k() -> Path:
    folder = movielens_dir()
    if folder is None:
        # Its licence forbids shipping it; CI has a copy, so there this never skips.
        if os.environ.get("RECOPS_REQUIRE_ML100K") == "1":
            pytest.fail("RECOPS_REQUIRE_ML100K=1 but no MovieLens-100K at ../shared/data/ml-100k or $RECOPS_ML100K_DIR")
        pytest.skip("MovieLens-100K not present (licence forbids redistribution; set RECOPS_ML100K_DIR)")
    return folder


@pytest.fixture(scope="session")
def amazon_beauty() -> Path:
    """Amazon Beauty 5-core: $RECOPS_AMAZON_BEAUTY_DIR, else ../shared/data/amazon-beauty beside the checkout."""
    folder = Path(os.environ.get("RECOPS_AMAZON_BEAUTY_DIR", REPO.parent / "shared" / "data" / "amazon-beauty"))
    if not (folder / "user_sequence.txt").is_file():
        # Its licence forbids shipping it; CI has a copy, so there this never skips.
        if os.environ.get("RECOPS_REQUIRE_AMAZON_BEAUTY") == "1":
            pytest.fail(f"RECOPS_REQUIRE_AMAZON_BEAUTY=1 but no Amazon Beauty at {folder}")
        pytest.skip("Amazon Beauty not present (licence forbids redistribution; set RECOPS_AMAZON_BEAUTY_DIR)")
    return folder


@pytest.fixture(scope="session")
def small_synthetic():
    """A small synthetic log (a few thousand events) shared by data tests."""
    from recops.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_users=200, n_items=120, days=10, seed=3))


@pytest.fixture
def anyio_backend():
    """Async tests (``pytest.mark.anyio``) run on asyncio, the loop the router runs on."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny two-tower model trained for one epoch and exported (about 10 s on CPU).

    Returns ``(data, train_result, model_dir)``; shared by the ranker, Triton and router tests.
    """
    from recops.api.recmodel import RecModelSpec
    from recops.data.prepare import prepare
    from recops.training.export import export_model
    from recops.training.trainer import train

    spec = RecModelSpec.model_validate({
        "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
        "lora": {"r": 4, "alpha": 8},
        "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8},
        "serving": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 2000},
    })
    data = prepare(spec.data)
    folder = tmp_path_factory.mktemp("tiny-model")
    result = train(spec, data, folder / "checkpoints")
    export_model(result.model, spec, data, folder / "model")
    return data, result, folder / "model"


@pytest.fixture(scope="session")
def model_dir(tiny_model):
    """The tiny model's exported directory (what routers and Triton serve in the tests)."""
    return tiny_model[2]


@pytest.fixture(scope="session")
def items(tiny_model):
    """The tiny model's item ids."""
    return tiny_model[0].items["item_id"].to_list()


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """The ``prometheus`` binary; skips (or fails with RECOPS_REQUIRE_PROMETHEUS=1) when absent."""
    from _prometheus import prometheus_binary

    binary = prometheus_binary()
    if binary is None:
        if os.environ.get("RECOPS_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("RECOPS_REQUIRE_PROMETHEUS=1 but no 'prometheus' on PATH (Debian: apt-get install prometheus)")
        pytest.skip("no 'prometheus' on PATH (Debian: apt-get install prometheus; or set RECOPS_PROMETHEUS_BIN)")
    return binary


@pytest.fixture(scope="session")
def prometheus_factory(prometheus_bin, tmp_path_factory):
    """``start(targets) -> PrometheusProcess``: real Prometheus servers, every one stopped at session end."""
    from _prometheus import PrometheusProcess

    started = []

    def start(targets, scrape_interval="1s"):
        server = PrometheusProcess(prometheus_bin, tmp_path_factory.mktemp("prometheus"), targets, scrape_interval)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def tiny_repository(tiny_model, tmp_path_factory):
    """The Triton model repository of ``tiny_model`` (recops export)."""
    from recops.serving.repository import build_repository

    return build_repository(tiny_model[2], tmp_path_factory.mktemp("repo") / "repo")


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository):
    """A real Triton (nvidia-pytriton's tritonserver) serving ``tiny_repository`` on loopback."""
    from recops.serving.triton_server import TritonServer

    with TritonServer(tiny_repository) as server:
        yield server
