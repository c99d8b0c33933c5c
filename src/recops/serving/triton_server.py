"""A real Triton Inference Server on this machine, from PyPI's ``nvidia-pytriton`` wheel.

The wheel ships ``tritonserver`` (Triton 2.51), the python backend and
python-backend stubs for several Pythons. Starting it needs three things the
wheel does not arrange by itself (see docs/architecture.md): the wheel's
``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``; a backends folder whose
``python/`` holds the stub for the running Python; and this environment's
``bin`` first on ``PATH``, because the stub runs ``model.py`` with the first
``python3`` it finds. The Triton image (triton_image/Dockerfile) arranges the same for the same wheel.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from recops.serving.processes import die_with_parent, free_port

__all__ = ["TritonError", "TritonPorts", "TritonServer", "find_triton", "free_port"]


class TritonError(RuntimeError):
    """Triton is missing, or did not start; the message carries the end of its log."""


@dataclass(frozen=True)
class TritonInstallation:
    """Where the wheel put the server, its libraries, backends and stubs."""

    binary: Path
    libraries: Path
    backends: Path
    stubs: Path

    def stub_for_this_python(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonError(f"nvidia-pytriton has no python-backend stub for Python {version} ({stub})")
        return stub


def find_triton() -> TritonInstallation:
    """Locate the ``nvidia-pytriton`` installation, or say how to get it."""
    try:
        import pytriton
    except ImportError as error:
        raise TritonError("Triton needs the 'nvidia-pytriton' package: pip install 'recops[serve]'") from error
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    installation = TritonInstallation(
        binary=root / "bin" / "tritonserver",
        libraries=root.parent.parent / "nvidia_pytriton.libs",
        backends=root / "backends",
        stubs=root / "python_backend_stubs",
    )
    if not installation.binary.is_file():
        raise TritonError(f"tritonserver not found at {installation.binary}")
    return installation


@dataclass(frozen=True)
class TritonPorts:
    """HTTP, gRPC and metrics ports."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> TritonPorts:
        return cls(free_port(), free_port(), free_port())


def prepare_backends(installation: TritonInstallation, folder: Path) -> Path:
    """A backends folder whose python backend carries the stub for the running Python."""
    python_backend = folder / "python"
    if not python_backend.exists():
        shutil.copytree(installation.backends / "python", python_backend)
    shutil.copy2(installation.stub_for_this_python(), python_backend / "triton_python_backend_stub")
    return folder


class TritonServer:
    """Start ``tritonserver`` on loopback for a model repository; stop it on exit.

    Use as a context manager: ``with TritonServer(repo) as server: server.http_url``.

    ``explicit_models`` (a tuple, possibly empty) starts Triton with ``--model-control-mode=explicit``
    and loads only those models (``--load-model``); the repository API (load/unload) is then open,
    which hot reloads need. Loading ``recops_ensemble`` loads the steps it names too. ``None`` (the
    default) keeps Triton's default mode: every model in the repository is loaded at start.
    """

    def __init__(
        self,
        repository: Path,
        ports: TritonPorts | None = None,
        log_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
        explicit_models: tuple[str, ...] | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.ports = ports or TritonPorts.free()
        self.extra_args = extra_args
        self.explicit_models = explicit_models
        self._scratch = tempfile.TemporaryDirectory(prefix="recops-triton-")
        self.log_path = log_path or Path(self._scratch.name) / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self, installation: TritonInstallation, backends: Path) -> list[str]:
        """The tritonserver command line (loopback only)."""
        return [
            str(installation.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.ports.http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.ports.grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.ports.metrics}",
            *self.model_control_args(),
            *self.extra_args,
        ]

    def model_control_args(self) -> list[str]:
        """``--model-control-mode=explicit`` and one ``--load-model`` per model, when explicit."""
        if self.explicit_models is None:
            return []
        return ["--model-control-mode=explicit", *(f"--load-model={name}" for name in self.explicit_models)]

    def start(self, timeout: float = 60.0) -> TritonServer:
        """Start the server and wait until it reports ready."""
        if not (self.repository.is_dir()):
            raise TritonError(f"{self.repository}: model repository not found")
        installation = find_triton()
        backends = prepare_backends(installation, Path(self._scratch.name) / "backends")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(installation.libraries), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        log = self.log_path.open("wb")
        # Own process group: a stop (or Ctrl-C of the parent) takes the python-backend stubs down too.
        self.process = subprocess.Popen(
            self.command(installation, backends), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def load_failures(self) -> list[str]:
        """Triton's reasons for models that failed to load, one line each, without the tracebacks."""
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        reasons = re.findall(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"$)", log, re.MULTILINE)
        return list(dict.fromkeys(f"{model}: {reason}" for model, reason in reasons))

    def _failure(self, headline: str) -> TritonError:
        failures = self.load_failures()
        detail = "\n".join(failures) if failures else self.log_tail()
        return TritonError(f"{headline}:\n{detail}")

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failure(f"tritonserver exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise self._failure(f"tritonserver not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and its backend stubs; SIGKILL if it does not exit in ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # stubs left in the group after the server exited
            os.killpg(group, signal.SIGKILL)

    def close(self) -> None:
        """Stop the server and remove its scratch folder (backends, default log)."""
        self.stop()
        self._scratch.cleanup()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
