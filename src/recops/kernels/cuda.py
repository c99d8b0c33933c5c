"""Loading the CUDA kernels of ``kernels/``: the ahead-of-time build if installed, a just-in-time one in development.

The Triton image installs the extension built for sm_80 and sm_90 (``pip install ./kernels``); a developer
with a GPU and nvcc gets it compiled from the checkout's sources on first use (cached by torch under
``TORCH_EXTENSIONS_DIR``). Anywhere else the entry points use the torch reference, and :func:`why_unavailable`
says why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

MODULE = "recops_kernels_cuda"
# The checkout's sources (absent from an installed wheel of recops, present in the repository).
SOURCE_DIR = Path(__file__).resolve().parents[3] / "kernels" / "csrc"
SOURCES = ("bindings.cpp", "retrieval.cu", "features.cu")
# Limits of the retrieval kernel (kernels/csrc/retrieval.cu: kMaxK, kMaxVectorsPerLane × 16 B × 32 lanes).
MAX_K = 2048
MAX_ROW_BYTES = 4096
MODES = ("auto", "torch", "cuda")


class KernelUnavailable(RuntimeError):
    """``RECOPS_KERNELS=cuda`` was asked for and the CUDA kernels cannot be loaded."""


def mode() -> str:
    """``RECOPS_KERNELS``: auto (default), torch or cuda."""
    value = os.environ.get("RECOPS_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"RECOPS_KERNELS must be one of {', '.join(MODES)}, got {value!r}")
    return value


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    if mode() == "torch":
        return None, "RECOPS_KERNELS=torch"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible to torch"
    try:
        return importlib.import_module(MODULE), ""
    except ImportError as error:
        prebuilt = f"{MODULE} is not installed ({error})"
    if not all((SOURCE_DIR / name).is_file() for name in SOURCES):
        return None, f"{prebuilt}, and there are no sources at {SOURCE_DIR} to build it from"
    from torch.utils import cpp_extension

    from recops.kernels.toolchain import ToolchainMissing, cuda_home

    try:
        home = str(cuda_home())
    except ToolchainMissing as error:
        return None, f"{prebuilt}, and it cannot be compiled here: {error}"
    os.environ.setdefault("CUDA_HOME", home)
    if cpp_extension.CUDA_HOME is None:  # torch looks for CUDA once, when cpp_extension is first imported
        cpp_extension.CUDA_HOME = home
    try:
        module = cpp_extension.load(
            name=MODULE,
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
        )
    except Exception as error:  # any build failure means: use the reference, and say why
        return None, f"{prebuilt}, and building it from {SOURCE_DIR} failed: {error}"
    return module, ""


def extension() -> ModuleType | None:
    """The loaded CUDA extension, or ``None`` (the entry points then use the torch reference)."""
    module, reason = _load()
    if module is None and mode() == "cuda":
        raise KernelUnavailable(f"RECOPS_KERNELS=cuda but the CUDA kernels cannot be used: {reason}")
    return module


def why_unavailable() -> str:
    """Why the CUDA kernels are not used ("" when they are)."""
    return _load()[1]


def describe() -> str:
    """One line for logs: which implementation the kernels' entry points use on a GPU."""
    module, reason = _load()
    return f"CUDA kernels from {module.__file__}" if module is not None else f"torch reference ({reason})"
