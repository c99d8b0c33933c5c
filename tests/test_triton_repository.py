"""The Triton model repository, served by a real Triton (nvidia-pytriton's tritonserver) on loopback.

Proves what a user relies on: scores over HTTP and gRPC equal the in-process model's, bad
requests get a 400 and the server stays up, dynamic batching engages under concurrent load,
the metrics endpoint answers, and a model with other features refuses to start.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from recops.api.recmodel import ServingSpec
from recops.cli import app
from recops.data.features import FeatureSchema
from recops.serving import contract as c
from recops.serving.ranker import Ranker
from recops.serving.repository import ARTIFACT, model_configs
from recops.serving.triton_client import parse_answer, request_inputs
from recops.serving.triton_server import TritonError, TritonServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repository(tiny_repository):
    return tiny_repository


@pytest.fixture(scope="module")
def server(tiny_triton):
    return tiny_triton


@pytest.fixture(scope="module")
def ranker(tiny_model):
    return Ranker.load(tiny_model[2])


def _histories(data, n):
    users = [u for u in range(data.n_users) if data.train.filter(pl.col("user_idx") == u).height][:n]
    ids = data.items["item_id"]
    return [
        [ids[i] for i in data.train.filter(pl.col("user_idx") == u).sort("timestamp", "item_idx")["item_idx"]]
        for u in users
    ]


def _infer(protocol, client, history, k, candidates=None, user="u1"):
    return parse_answer(client.infer(c.ENSEMBLE, request_inputs(protocol, user, history, k, candidates)))


def test_configs_follow_the_serving_spec():
    serving = ServingSpec.model_validate({"maxBatchSize": 32, "maxQueueDelayMicroseconds": 500, "instanceCount": 3})
    configs = model_configs(serving, history_length=50, gpu=True)
    ranker = configs[c.RANKER]
    assert ranker.max_batch_size == 32 and ranker.dynamic_batching.max_queue_delay_microseconds == 500
    assert ranker.instance_group[0].count == 3 and ranker.instance_group[0].kind == ranker.instance_group[0].KIND_GPU
    assert configs[c.PREPROCESS].instance_group[0].kind == configs[c.PREPROCESS].instance_group[0].KIND_CPU
    assert [s.model_name for s in configs[c.ENSEMBLE].ensemble_scheduling.step] == [
        c.PREPROCESS, c.RANKER, c.POSTPROCESS
    ]
    assert configs[c.PREPROCESS].output[0].dims == [50]  # the history length of the feature schema
    cpu = model_configs(serving, history_length=50, gpu=False)[c.RANKER]
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU


@pytest.mark.parametrize("protocol", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_scores_over_the_wire_equal_the_in_process_model(server, tiny_model, ranker, protocol):
    data = tiny_model[0]
    client = protocol.InferenceServerClient(server.http_url if protocol is triton_http else server.grpc_url)
    histories = [*_histories(data, 15), []]
    pool = data.items["item_id"].to_list()[10:40]
    for row, history in enumerate(histories):
        k = 1 + row % 10
        candidates = pool if row % 3 == 0 else None
        got = _infer(protocol, client, history, k, candidates)
        (expected,) = ranker.recommend([history], k=k, candidates=candidates)
        assert got.item_ids == expected.item_ids
        for name in ("scores", "click", "like"):
            assert np.allclose(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"history": ["no-such-item"]}, "history has unknown item ids: no-such-item"),
        ({"k": 0}, "k must be between 1 and 80, got 0"),
        ({"k": 81}, "k must be between 1 and 80, got 81"),
        ({"history": ["x"] * 1001}, "history has 1001 items; at most 1000"),
        ({"candidates": []}, "candidates is empty"),
        ({"candidates": ["nope"]}, "candidates has unknown item ids: nope"),
    ],
)
def test_bad_requests_get_a_400_and_the_server_stays_up(server, tiny_model, change, message):
    first = tiny_model[0].items["item_id"][0]
    client = triton_http.InferenceServerClient(server.http_url)
    request = {"history": [first], "k": 5, "candidates": None, **change}
    with pytest.raises(InferenceServerException) as refused:
        _infer(triton_http, client, **request)
    assert refused.value.status() == "400" and message in refused.value.message()
    assert len(_infer(triton_http, client, [first], 3).item_ids) == 3


def _metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {model} not in Triton's metrics"
    return float(match.group(1))


def test_dynamic_batching_engages_under_concurrent_load(server, tiny_model):
    histories = _histories(tiny_model[0], 40)
    client = triton_grpc.InferenceServerClient(server.grpc_url)

    def before() -> str:
        return urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()

    start = before()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda h: _infer(triton_grpc, client, h, 5), histories * 5))
    assert all(len(a.item_ids) == 5 for a in answers)
    end = before()
    requests = _metric(end, "nv_inference_request_success", c.RANKER) - _metric(
        start, "nv_inference_request_success", c.RANKER
    )
    executions = _metric(end, "nv_inference_exec_count", c.RANKER) - _metric(start, "nv_inference_exec_count", c.RANKER)
    assert requests == len(answers)
    assert executions < requests  # several requests per model execution: the batcher grouped them


def test_a_model_with_other_features_refuses_to_start(repository, tmp_path):
    tampered = shutil.copytree(repository, tmp_path / "repo")
    path = tampered / ARTIFACT / "feature_schema.json"
    document = json.loads(path.read_text())
    document.pop("hash")
    document["history_length"] += 1  # a consistent file, written by code with other features
    path.write_text(json.dumps(FeatureSchema(**document).to_json()))
    with pytest.raises(TritonError, match="feature schema hash"), TritonServer(tampered):
        pass


def test_export_cli_writes_a_repository_and_refuses_bad_targets(tiny_model, tmp_path):
    model_dir = tiny_model[2]
    runner = CliRunner()
    written = runner.invoke(app, ["export", "--model", str(model_dir), "--out", str(tmp_path / "repo")])
    assert written.exit_code == 0, written.output
    assert (tmp_path / "repo" / c.ENSEMBLE / "config.pbtxt").is_file()
    again = runner.invoke(app, ["export", "--model", str(model_dir), "--out", str(tmp_path / "repo")])
    assert again.exit_code == 0  # a repository is replaced
    not_a_model = runner.invoke(app, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "r2")])
    assert not_a_model.exit_code == 2 and "not an exported recops model" in not_a_model.output
    occupied = runner.invoke(app, ["export", "--model", str(model_dir), "--out", str(model_dir)])
    assert occupied.exit_code == 2 and "refusing to overwrite" in occupied.output
