"""Build the CUDA kernels ahead of time into a folder and list the GPU code inside.

    python kernels/build.py --out kernels/build/lib            # sm_80, sm_90 and PTX (TORCH_CUDA_ARCH_LIST)
    PYTHONPATH=kernels/build/lib python -c "import recops_kernels_cuda"

No GPU is needed: nvcc comes from CUDA_HOME, PATH or PyPI's nvidia-cuda-nvcc wheels (`make kernels`).
CI runs this (tests/test_kernels_build.py), so a compile error in kernels/csrc fails CI.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from recops.kernels.toolchain import ToolchainMissing, cuda_home

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0 9.0+PTX"


def build(out: Path, archs: str = DEFAULT_ARCHS) -> Path:
    """Compile ``kernels/csrc`` into ``out``; returns the extension's path."""
    env = dict(os.environ, CUDA_HOME=str(cuda_home()), TORCH_CUDA_ARCH_LIST=archs)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    temp = out.parent / f"{out.name}.tmp"
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out), "--build-temp", str(temp)]
    result = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "error" in line]
        raise SystemExit("building the kernels failed:\n" + "\n".join(errors[:20] or result.stderr.splitlines()[-20:]))
    return next(out.glob("recops_kernels_cuda*.so"))


def gpu_code(extension: Path) -> dict[str, list[str]]:
    """The cubins (``sm_XY``) and PTX (``compute_XY``) inside the extension, from cuobjdump."""
    cuobjdump = cuda_home() / "bin" / "cuobjdump"

    def listed(flag: str, pattern: str) -> list[str]:
        output = subprocess.run([str(cuobjdump), flag, str(extension)], capture_output=True, text=True, check=True)
        return sorted(set(re.findall(pattern, output.stdout)))

    return {"cubin": listed("--list-elf", r"\.(sm_\d+)\."), "ptx": listed("--list-ptx", r"\.(sm_\d+)\.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "build" / "lib", help="folder for the extension")
    parser.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS),
                        help=f"TORCH_CUDA_ARCH_LIST (default {DEFAULT_ARCHS!r})")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        extension = build(args.out.resolve(), args.arch)
    except ToolchainMissing as error:
        raise SystemExit(str(error)) from None
    print(f"built {extension} in {time.monotonic() - started:.0f} s")
    if (cuda_home() / "bin" / "cuobjdump").exists():
        code = gpu_code(extension)
        print(f"GPU code: cubin {', '.join(code['cubin'])}; PTX {', '.join(code['ptx']) or 'none'}")


if __name__ == "__main__":
    main()
