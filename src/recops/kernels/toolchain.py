"""Where nvcc is, for building the CUDA kernels: ``CUDA_HOME``, ``nvcc`` on ``PATH``, or PyPI's wheels.

PyPI's ``nvidia-cuda-nvcc``, ``nvidia-cuda-crt``, ``nvidia-nvvm`` and ``nvidia-cuda-runtime`` wheels
(installed by ``make kernels``, at the CUDA version of the installed torch) hold a complete compiler
under ``site-packages/nvidia/cu<major>``, laid out as a CUDA installation except for ``lib64``, which
torch's build expects: :func:`cuda_home` assembles that layout from links in a cache folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


class ToolchainMissing(RuntimeError):
    """No CUDA compiler was found."""


def cuda_major() -> str:
    """The CUDA major version the installed torch was built for (``"13"``), the version nvcc must have."""
    if torch.version.cuda is None:
        raise ToolchainMissing(f"torch {torch.__version__} is a CPU build: the CUDA kernels need a CUDA torch")
    return torch.version.cuda.split(".")[0]


def wheel_root() -> Path | None:
    """``site-packages/nvidia/cu<major>`` when PyPI's nvcc wheel is installed there."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for base in map(Path, nvidia.__path__):
        root = base / f"cu{cuda_major()}"
        if (root / "bin" / "nvcc").is_file():
            return root
    return None


def cuda_home(cache: Path | None = None) -> Path:
    """A CUDA installation with nvcc for ``CUDA_HOME``; raises :class:`ToolchainMissing` naming what to install."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return Path(nvcc).resolve().parents[1]
    root = wheel_root()
    if root is None:
        raise ToolchainMissing(
            "no nvcc: set CUDA_HOME, put nvcc on PATH, or run `make kernels` "
            f"(installs PyPI's nvidia-cuda-nvcc for CUDA {torch.version.cuda})"
        )
    home = (cache or Path.home() / ".cache" / "recops" / "cuda-home") / root.name
    (home / "lib64").mkdir(parents=True, exist_ok=True)
    for name in ("bin", "include", "nvvm"):
        _link(home / name, root / name)
    # torch links the extension with -lcudart from lib64; the wheel ships only libcudart.so.<major>.
    _link(home / "lib64" / "libcudart.so", root / "lib" / f"libcudart.so.{cuda_major()}")
    return home


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def cuda_include() -> Path:
    """The CUDA headers (``cuda_runtime.h``...): ``CUDA_HOME``'s, or those of torch's nvidia-cuda-runtime wheel."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    try:
        import nvidia

        candidates += [Path(base) / f"cu{cuda_major()}" / "include" for base in nvidia.__path__]
    except ImportError:
        pass
    for include in candidates:
        if (include / "cuda_runtime.h").is_file():
            return include
    raise ToolchainMissing("no CUDA headers (cuda_runtime.h): set CUDA_HOME or install torch's nvidia-cuda-runtime")


# PyPI's compiler wheels, at the version of torch's CUDA runtime wheel: `make kernels` installs them.
COMPILER_WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cuobjdump")


def compiler_requirements() -> list[str]:
    """Pip requirements for nvcc matching the installed torch's CUDA runtime wheel exactly."""
    from importlib import metadata

    major = cuda_major()
    for runtime, suffix in ((f"nvidia-cuda-runtime-cu{major}", f"-cu{major}"), ("nvidia-cuda-runtime", "")):
        try:
            version = metadata.version(runtime)
        except metadata.PackageNotFoundError:
            continue
        if version.split(".")[0] == major:
            return [f"{wheel}{suffix}=={version}" for wheel in COMPILER_WHEELS]
    raise ToolchainMissing(f"torch's CUDA runtime wheel (nvidia-cuda-runtime, CUDA {major}) is not installed")


if __name__ == "__main__":
    print(" ".join(compiler_requirements()))
