"""``recops serve router`` as a child process: started, waited for, measured and stopped cleanly.

Used where the router must be a real separate process (the demo, the serving benchmark): its own
process group, dying with its parent, readiness from ``/readyz``, SIGTERM for a graceful stop that
flushes the feedback log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from recops.serving.processes import die_with_parent


class RouterProcessError(RuntimeError):
    """The router exited or did not become ready; the message carries the end of its log."""


class RouterProcess:
    """One ``recops serve router`` process on 127.0.0.1."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        command = [sys.executable, "-m", "recops", "serve", "router", "--config", str(config), "--port", str(port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self.peak_rss_mb = 0.0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 60) -> RouterProcess:
        """Wait until ``/readyz`` answers 200 (every arm's upstream ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RouterProcessError(f"router exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RouterProcessError(f"router not ready after {timeout:g} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the router has used so far."""
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def sample_rss(self, stop: threading.Event, every_s: float = 0.2) -> None:
        """Record the peak resident set size until ``stop`` is set (run it in a thread)."""
        import psutil

        info = psutil.Process(self.process.pid)
        while not stop.wait(every_s):
            self.peak_rss_mb = max(self.peak_rss_mb, info.memory_info().rss / 2**20)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM: the router drains in-flight requests and flushes the feedback log; SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode
