"""Skip for want of a prerequisite, or fail where CI requires it; let a cold build's progress be seen."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import pytest

from e2e_tests.localcluster import ClusterError

T = TypeVar("T")


@contextlib.contextmanager
def uncaptured(config: pytest.Config) -> Iterator[None]:
    """Let output through pytest's capture: a cold build's progress must be seen as it happens."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
        return
    with capture.global_and_fixture_disabled():
        yield


def unavailable(reason: str) -> NoReturn:
    """Skip for want of a cluster (or of a real node in it), or fail where one is required (CI)."""
    if os.environ.get("RECOPS_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"RECOPS_REQUIRE_CLUSTER=1 but there is no cluster: {reason}", pytrace=False)
    pytest.skip(f"no Kubernetes cluster: {reason}")


def built_or_unavailable(config: pytest.Config, build: Callable[[], T], failure: str) -> T:
    """``build()``'s result, its progress shown as it happens; ``unavailable`` (skip, or fail under CI) when it
    raises ClusterError. The skip is raised outside the ``except`` so that it does not chain the traceback."""
    problem = ""
    try:
        with uncaptured(config):
            return build()
    except ClusterError as exc:
        problem = str(exc)
    unavailable(f"{failure}:\n{problem}")
