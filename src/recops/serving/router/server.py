"""Running the router on uvicorn (uvloop event loop, httptools parser), one or several workers."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from recops.serving.router.app import CONFIG_ENV, FEEDBACK_PATH_ENV, create_app
from recops.serving.router.runtime import PER_WORKER_LOG_ENV


def _log_config(level: str) -> dict[str, Any]:
    # uvicorn configures logging in every worker process; add the router's logger to its config so
    # reload messages appear with several workers too (a basicConfig in this process would not reach them).
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["recops"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def serve(config_path: Path, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          log_level: str = "info", feedback_path: Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT; shutdown waits for in-flight requests, then flushes the feedback log.

    ``feedback_path`` overrides the config's ``feedback.path``.

    With ``workers > 1`` each worker is a process with its own upstream connections and its own
    feedback log file (``<stem>-<pid><suffix>``); ``/metrics`` sums all workers through
    prometheus-client's multiprocess mode (``$PROMETHEUS_MULTIPROC_DIR``, a fresh temporary folder
    unless set). The distinct-user count is per worker, as it is per replica.
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,  # no per-request logging on the hot path; Prometheus has the numbers
        "server_header": False,
        "log_config": _log_config(log_level),
        "log_level": log_level,
        "backlog": 4096,
        "timeout_graceful_shutdown": 30,
        # Longer than the idle timeouts of the load balancers and client pools in front (AWS ALB 60 s,
        # httpx 5 s): the server must never close an idle connection a client is about to reuse.
        "timeout_keep_alive": 75,
    }
    if workers == 1:
        uvicorn.run(create_app(config_path, feedback_path=feedback_path), **options)
        return
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    if feedback_path is not None:
        os.environ[FEEDBACK_PATH_ENV] = str(feedback_path.resolve())
    os.environ[PER_WORKER_LOG_ENV] = "1"
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="recops-router-metrics-")
    uvicorn.run("recops.serving.router.app:app_from_env", factory=True, workers=workers, **options)
