"""The CUDA kernels compile for A100 (sm_80) and H100/H200 (sm_90), with PTX for newer GPUs, on a machine
without a GPU: nvcc comes from PyPI (`make cuda-toolchain`). A compile error in kernels/csrc fails here.
Without nvcc this skips, and fails with RECOPS_REQUIRE_NVCC=1 (set in .ci/run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recops.kernels.toolchain import ToolchainMissing, cuda_home

REPO = Path(__file__).resolve().parents[1]


def load_build_script():
    spec = importlib.util.spec_from_file_location("kernels_build", REPO / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    try:
        cuda_home()
    except ToolchainMissing as error:
        if os.environ.get("RECOPS_REQUIRE_NVCC") == "1":
            pytest.fail(f"RECOPS_REQUIRE_NVCC=1 but {error}")
        pytest.skip(str(error))
    return load_build_script().build(tmp_path_factory.mktemp("kernels") / "lib", "8.0 9.0+PTX")


@pytest.mark.slow
def test_the_kernels_compile_for_sm80_and_sm90_with_ptx(extension):
    code = load_build_script().gpu_code(extension)
    assert code["cubin"] == ["sm_80", "sm_90"]
    assert code["ptx"] == ["sm_90"]  # compute_90 PTX: newer GPUs compile it when the extension loads


@pytest.mark.slow
def test_the_built_extension_loads_and_refuses_tensors_off_the_gpu(extension):
    probe = (
        "import torch, recops_kernels_cuda as k\n"
        "for call in (lambda: k.retrieve_topk(torch.randn(2, 8), torch.randn(4, 8), None, 1.0, 2),\n"
        "             lambda: k.head_features(torch.randn(2, 8), torch.randn(2, 8))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as error:\n"
        "        print(str(error).splitlines()[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(extension.parent)),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["users must be a CUDA tensor", "users and items must be CUDA tensors"]
