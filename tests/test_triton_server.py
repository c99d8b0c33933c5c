"""A real Triton server (nvidia-pytriton's tritonserver) started, queried and stopped on loopback.

No mock: the model is a tiny python-backend model written into a repository by the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from recops.serving.triton_server import TritonError, TritonServer

CONFIG = """name: "double"
backend: "python"
max_batch_size: 8
input [{ name: "X", data_type: TYPE_FP32, dims: [3] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [3] }]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""
MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (2 * x).astype(np.float32))]))
        return responses
"""


@pytest.fixture
def repository(tmp_path):
    model = tmp_path / "repo" / "double"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL)
    return tmp_path / "repo"


def test_serves_http_grpc_and_metrics_then_stops(repository):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with TritonServer(repository) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        request = httpclient.InferInput("X", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        assert np.array_equal(http.infer("double", [request]).as_numpy("Y"), 2 * x)

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        request = grpcclient.InferInput("X", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        assert np.array_equal(grpc.infer("double", [request]).as_numpy("Y"), 2 * x)

        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            assert 'nv_inference_request_success{model="double"' in response.read().decode()
        process = server.process
    assert process.poll() is not None  # stopped with the context
    stubs = subprocess.run(["pgrep", "-f", str(repository)], capture_output=True, text=True).stdout.split()
    assert stubs == []  # no backend stub left behind


def test_a_broken_model_fails_start_with_tritons_reason(repository):
    (repository / "double" / "config.pbtxt").write_text(CONFIG.replace("TYPE_FP32", "TYPE_NOPE", 1))
    server = TritonServer(repository)
    with pytest.raises(TritonError, match="exited"):
        server.start(timeout=60)
    server.stop()


def test_a_missing_repository_is_named(tmp_path):
    with pytest.raises(TritonError, match="model repository not found"):
        TritonServer(tmp_path / "nope").start()


def test_recops_serve_triton_runs_until_interrupted(repository):
    command = [sys.executable, "-m", "recops", "serve", "triton", "--repo", str(repository),
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "triton ready" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        assert "triton ready" in line
        process.send_signal(2)  # Ctrl-C
        assert process.wait(timeout=30) == 0
        left = subprocess.run(["pgrep", "-f", str(repository)], capture_output=True, text=True).stdout.split()
        assert left == []  # the server and its stubs went with the command
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["pkill", "-f", str(repository)], check=False)


def test_a_killed_parent_leaves_no_server_behind(repository):
    """SIGKILL gives the command no chance to clean up: the kernel takes the server down with it."""
    command = [sys.executable, "-m", "recops", "serve", "triton", "--repo", str(repository),
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "triton ready" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        assert "triton ready" in line
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        left = ["?"]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = subprocess.run(["pgrep", "-f", str(repository)], capture_output=True, text=True).stdout.split()
        assert left == []  # tritonserver and its python-backend stubs are gone
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["pkill", "-9", "-f", str(repository)], check=False)
