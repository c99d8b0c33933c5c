"""Helpers for the local servers recops starts (Triton, Prometheus, the router): ports and lifetimes."""

from __future__ import annotations

import signal
import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent() -> None:
    """``preexec_fn`` for a child server: the kernel SIGKILLs it when its parent dies (Linux).

    A parent killed without running its clean-up (SIGKILL, a crashed test run) then leaves no
    server behind; a clean stop still goes through SIGTERM and a graceful shutdown.
    """
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # no glibc: the caller's stop() still applies
