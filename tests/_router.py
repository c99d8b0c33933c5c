"""Helpers shared by the router tests: config files, a running app with a client, metric lookups."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from recops.serving.router.app import create_app


def router_config(model_dir: Path, tmp_path: Path, *, arms: list[tuple[str, int]] | None = None,
                  experiment: str = "exp", salt: str = "salt", limits: dict | None = None,
                  feedback: dict | None = None, models: dict[str, Path] | None = None) -> dict[str, Any]:
    """A config dict: every arm serves ``model_dir`` in-process unless ``models`` names another."""
    arms = arms or [("treatment", 3000), ("control", 7000)]
    models = models or {}
    return {
        "experiment": experiment,
        "salt": salt,
        "arms": [{"name": name, "weightBp": bp, "model": str(models.get(name, model_dir))} for name, bp in arms],
        "limits": {"maxK": 20, "maxHistory": 30, "maxBodyBytes": 4096, "upstreamTimeoutSeconds": 10, **(limits or {})},
        "feedback": {"path": str(tmp_path / "log" / "feedback.jsonl"), **(feedback or {})},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write atomically (rename), as an editor or a ConfigMap update would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
    return path


@asynccontextmanager
async def serving(config_path: Path, **options: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running, and a client talking to it in-process."""
    app = create_app(config_path, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=30) as client:
            yield app, client


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def log_lines(folder: Path) -> list[dict[str, Any]]:
    """Every line of every feedback log file in ``folder`` (rotated files first, by name)."""
    import json

    files = sorted(folder.glob("feedback-*.jsonl")) + sorted(folder.glob("feedback.jsonl"))
    return [json.loads(line) for file in files for line in file.read_text().splitlines() if line]


def wait_until(condition: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
