"""A real Prometheus server on loopback, for gates without a cluster (the demo) and for tests.

:class:`PrometheusProcess` runs the ``prometheus`` binary (Debian's package, or
``$RECOPS_PROMETHEUS_BIN``) on a free loopback port with a private config and TSDB, scraping
the given targets, in its own process group and dying with its parent, so that stopping it, or
the parent crashing, cannot leave anything behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from recops.serving.processes import die_with_parent, free_port


def prometheus_binary() -> str | None:
    """``$RECOPS_PROMETHEUS_BIN``, else ``prometheus`` on PATH (Debian: /usr/bin/prometheus)."""
    return os.environ.get("RECOPS_PROMETHEUS_BIN") or shutil.which("prometheus")


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, ValueError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})")
        time.sleep(interval)


class PrometheusProcess:
    """One ``prometheus`` server scraping ``targets`` every ``scrape_interval``."""

    def __init__(self, binary: str, workdir: Path, targets: Sequence[str], scrape_interval: str = "1s") -> None:
        self.binary = binary
        self.workdir = Path(workdir).resolve()  # the server runs in it: relative paths would resolve twice
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> PrometheusProcess:
        """Start and wait until ``/-/ready``; a port taken between choosing and binding is retried."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        targets = ", ".join(f'"{t}"' for t in self.targets)
        config.write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  scrape_timeout: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: router\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        for attempt in range(attempts):
            self.port = free_port()
            log = (self.workdir / "prometheus.log").open("ab")
            try:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # own process group: stop() signals the group, nothing leaks
                    preexec_fn=die_with_parent,
                    cwd=self.workdir,
                )
            finally:
                log.close()
            try:
                poll(self._ready, timeout, f"prometheus on port {self.port} to be ready")
                return self
            except Exception:
                exited = self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"prometheus did not start; log tail:\n{tail}") from None
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            # Not one of the errors poll() retries on: an exited server (e.g. port taken) fails at once.
            raise RuntimeError(f"prometheus exited with {self.process.returncode}")
        return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.process.pid, sig)  # pgid == pid thanks to start_new_session

    def kill(self) -> None:
        """SIGKILL, as a crash would: the server stops answering at once."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    # ------------------------------------------------------------------ direct reads (for waiting)

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        response.raise_for_status()
        body = response.json()
        if body["status"] != "success":
            raise ValueError(body)
        return body["data"]["result"]

    def values_by(self, promql: str, label: str) -> dict[str, float]:
        return {item["metric"].get(label, ""): float(item["value"][1]) for item in self.query(promql)}

    def wait_for_values(self, promql: str, label: str, expected: Mapping[str, float], timeout: float = 20.0) -> None:
        """Poll until ``promql`` (grouped by ``label``) returns exactly ``expected``."""
        wanted = {k: float(v) for k, v in expected.items()}
        poll(lambda: self.values_by(promql, label) == wanted, timeout, f"{promql} == {wanted}")
