"""Ahead-of-time build of recops' CUDA kernels: ``pip install --no-build-isolation ./kernels``.

The extension must be built against the torch it will run with (the Triton image builds it in the
PyTorch devel image of its own torch), for the GPU architectures in ``TORCH_CUDA_ARCH_LIST``: sm_80
(A100) and sm_90 (H100/H200) by default, plus PTX so that newer GPUs can compile it at load time.
``python kernels/build.py`` does the same into a folder, finding nvcc for you.
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")

setup(
    name="recops-kernels",
    version="0.1.0",
    description="CUDA kernels of recops' serving hot path (fused top-k retrieval, head-feature assembly)",
    license="Apache-2.0",
    python_requires=">=3.10",
    ext_modules=[
        CUDAExtension(
            name="recops_kernels_cuda",
            sources=["csrc/bindings.cpp", "csrc/retrieval.cu", "csrc/features.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
