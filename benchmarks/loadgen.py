"""Compiled load generators for the serving benchmark: wrk (closed loop) and vegeta (open loop).

A Python client on the same two cores would measure itself, so load comes from separate,
compiled processes: ``wrk`` from Debian (``apt-get install wrk``) for closed-loop
saturation, ``vegeta`` (Go; built with ``go install`` when missing) for a fixed arrival
rate, which wrk cannot hold. Both report latency percentiles; this module runs them and
parses their reports into plain dicts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class Target:
    """Where to send, and the JSON bodies to rotate through (one per simulated user)."""

    url: str
    bodies: Sequence[str]


def _milliseconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def _wrk_script(target: Target, folder: Path) -> Path:
    bodies = ",\n".join(f"[==[{body}]==]" for body in target.bodies)
    script = folder / "bodies.lua"
    script.write_text(
        "local bodies = {\n" + bodies + "\n}\n"
        "local i = 0\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[i])\n"
        "end\n"
    )
    return script


def parse_wrk(report: str) -> dict[str, float]:
    """qps, p50/p99 (ms), request and error counts from ``wrk --latency`` output."""
    percentiles = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", report, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", report).group(1))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(int(g) for g in socket.groups()) if socket else 0)
    return {
        "qps": float(re.search(r"Requests/sec:\s+([\d.]+)", report).group(1)),
        "p50_ms": _milliseconds(percentiles["50"]),
        "p99_ms": _milliseconds(percentiles["99"]),
        "requests": requests,
        "errors": errors,
        "error_rate": errors / max(requests + (int(socket.group(4)) if socket else 0), 1),
    }


def run_wrk(target: Target, concurrency: int, duration_s: float, threads: int = 2) -> dict[str, float]:
    """Closed loop: ``concurrency`` connections sending back-to-back for ``duration_s``."""
    with tempfile.TemporaryDirectory(prefix="recops-wrk-") as folder:
        script = _wrk_script(target, Path(folder))
        command = [
            "wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency",
            "--timeout", "10s", "-s", str(script), target.url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return parse_wrk(done.stdout)


def find_vegeta() -> str:
    """The vegeta binary: on PATH, in Go's bin folder, or built now from the Go module proxy."""
    found = shutil.which("vegeta")
    gobin = Path(os.environ.get("GOBIN") or Path.home() / "go" / "bin")
    if found:
        return found
    if not (gobin / "vegeta").is_file():
        if not shutil.which("go"):
            raise SystemExit("the open-loop run needs vegeta (or Go to build it): go install " + VEGETA_MODULE)
        subprocess.run(["go", "install", VEGETA_MODULE], check=True, env={**os.environ, "GOBIN": str(gobin)})
    return str(gobin / "vegeta")


def run_vegeta(target: Target, rate: int, duration_s: float) -> dict[str, float]:
    """Open loop: ``rate`` requests per second whatever the latency (no coordinated omission)."""
    vegeta = find_vegeta()
    with tempfile.TemporaryDirectory(prefix="recops-vegeta-") as folder:
        targets = Path(folder) / "targets.jsonl"
        with targets.open("w") as out:
            for body in target.bodies:
                out.write(json.dumps({
                    "method": "POST", "url": target.url, "header": {"Content-Type": ["application/json"]},
                    "body": base64.b64encode(body.encode()).decode(),
                }) + "\n")
        attack = subprocess.run(
            [vegeta, "attack", "-format=json", f"-targets={targets}", f"-rate={rate}", f"-duration={duration_s:g}s",
             "-timeout=10s", "-max-workers=2000"],
            capture_output=True, check=True,
        )
        report = subprocess.run(
            [vegeta, "report", "-type=json"], input=attack.stdout, capture_output=True, check=True
        )
    result = json.loads(report.stdout)
    return {
        "rps": result["rate"],
        "p50_ms": result["latencies"]["50th"] / 1e6,
        "p99_ms": result["latencies"]["99th"] / 1e6,
        "requests": result["requests"],
        "error_rate": 1.0 - result["success"],
    }
