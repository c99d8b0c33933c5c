"""Switch a live Triton from one model revision to the next without dropping a request.

The ensemble's three steps all depend on the revision (item ids, feature schema, weights), so they
must switch together. Each revision's steps therefore carry its name (``recops_ranker_<R>``, see
``recops.serving.repository``) and only ``recops_ensemble``, which clients call, is shared:

1. write R2's step models into the repository beside R1's and load them (Triton's repository API;
   Triton runs in ``--model-control-mode=explicit``);
2. reload ``recops_ensemble`` with a config whose steps are R2's: the one atomic switch. Triton
   keeps the old ensemble serving until the new one is ready, and a request binds every step model
   when it enters the ensemble, so in-flight requests finish on R1's steps and later ones run on
   R2's: a response is R1's or R2's, never a mix;
3. unload R1's steps and delete their folders (and any step folder of another revision left by an
   interrupted attempt).

If step 1 or 2 fails nothing serving is touched: R2's steps are unloaded and deleted again and
the error names the model and Triton's reason. The plan (which models, in which order, what to
undo) is computed by pure functions; :func:`apply_plan` only carries it out.

:class:`Reloader` is the sidecar next to Triton (``recops serve reloader``): it watches a JSON file
``{"revision": "...", "model": "/artifacts/..."}`` and hot-reloads whenever its content names
another revision.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from recops.api.recmodel import ServingSpec
from recops.serving import contract as c
from recops.serving.repository import (
    STEP_FOLDER,
    ExportedModel,
    RepositoryError,
    StepNames,
    check_model,
    ensemble_config,
    ensemble_steps,
    read_config,
    write_ensemble,
    write_steps,
)

__all__ = [
    "ModelControl",
    "ReloadError",
    "ReloadPlan",
    "ReloadResult",
    "Reloader",
    "TritonControl",
    "TritonUnreachable",
    "WatchFileError",
    "WatchTarget",
    "apply_plan",
    "hot_reload",
    "parse_watch_file",
    "plan_reload",
]

log = logging.getLogger("recops.reloader")
T = TypeVar("T")


class ReloadError(RuntimeError):
    """A model of the new revision did not load; ``model`` names it, ``reason`` is Triton's."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"{model} failed to load: {reason}")
        self.model = model
        self.reason = reason


class TritonUnreachable(RuntimeError):
    """Triton did not answer (not started yet, or gone)."""


class ModelControl(Protocol):
    """What a hot reload needs from Triton (the repository API); :class:`TritonControl` over HTTP."""

    def serving_steps(self) -> StepNames | None: ...

    def load(self, name: str, config: mc.ModelConfig | None = None) -> None: ...

    def unload(self, name: str) -> None: ...


# --- pure: the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadPlan:
    """What switching to ``target`` does, in order; ``previous`` is ``None`` on a first load."""

    target: StepNames
    previous: StepNames | None
    ensemble: mc.ModelConfig
    stale: tuple[str, ...] = ()  # step folders of other revisions (interrupted attempts), removed at the end

    @property
    def prepare(self) -> tuple[str, ...]:
        """Step models to load before the switch: the ranker first, as the slowest to load and the one
        whose weights are likeliest to be bad, so that a broken revision fails before the others load."""
        return (self.target.ranker, self.target.preprocess, self.target.postprocess)

    @property
    def retire(self) -> tuple[str, ...]:
        """Models to unload and delete once the ensemble serves ``target``."""
        old = () if self.previous is None else self.previous.all
        return tuple(dict.fromkeys([*old, *self.stale]))

    def operations(self) -> list[tuple[str, str]]:
        """The whole plan as ``(action, model)`` pairs, for logs and tests."""
        return [
            *(("load", name) for name in self.prepare),
            ("switch", c.ENSEMBLE),
            *(("unload", name) for name in self.retire),
            *(("delete", name) for name in self.retire),
        ]


def plan_reload(
    previous: StepNames | None, target: StepNames, serving: ServingSpec, folders: Iterable[str] = ()
) -> ReloadPlan:
    """The plan from ``previous`` (what the live ensemble runs) to ``target``.

    ``folders`` are the repository's folder names: step folders of neither revision are leftovers
    and are retired with ``previous``. Refuses a target that is already serving: its models are
    live and cannot be rewritten in place (a new model needs a new revision).
    """
    if previous == target:
        raise ValueError(f"revision {target.revision} is already serving")
    stale = leftovers(target, folders, keep=previous.all if previous else ())
    return ReloadPlan(target, previous, ensemble_config(serving, target), stale)


def leftovers(serving: StepNames, folders: Iterable[str], keep: Iterable[str] = ()) -> tuple[str, ...]:
    """Step folders among ``folders`` that belong neither to ``serving`` nor to ``keep``."""
    kept = set(serving.all) | set(keep)
    return tuple(sorted(name for name in folders if STEP_FOLDER.match(name) and name not in kept))


# --- side effects -------------------------------------------------------------------------


class TritonControl:
    """Triton's repository API over HTTP (``tritonclient.http``)."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        import tritonclient.http as httpclient

        self.url = url.removeprefix("http://").removeprefix("https://").rstrip("/")
        # Loading a ranker starts a python stub and reads torch weights: minutes on a busy node.
        self.client = httpclient.InferenceServerClient(self.url, connection_timeout=10.0, network_timeout=timeout)

    def _call(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from tritonclient.utils import InferenceServerException

        try:
            return call(*args, **kwargs)
        except InferenceServerException:
            raise
        except (OSError, TimeoutError) as error:  # refused, reset, timed out: Triton is not there
            raise TritonUnreachable(f"triton at {self.url} did not answer {what}: {error}") from error

    def serving_steps(self) -> StepNames | None:
        """The step models the live ``recops_ensemble`` points at; ``None`` when it is not loaded."""
        if not self._call("a readiness check", self.client.is_model_ready, c.ENSEMBLE):
            return None
        config = self._call("a config request", self.client.get_model_config, c.ENSEMBLE)
        names = [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]
        if len(names) != 3:
            raise RepositoryError(f"the live {c.ENSEMBLE} has steps {names}: not a recops ensemble")
        return StepNames(*names)

    def load(self, name: str, config: mc.ModelConfig | None = None) -> None:
        """Load (or reload) ``name``; with ``config`` Triton uses it instead of the folder's config.pbtxt."""
        text = None if config is None else json_format.MessageToJson(config, preserving_proto_field_name=True)
        self._call(f"loading {name}", self.client.load_model, name, config=text)

    def unload(self, name: str) -> None:
        """Unload ``name`` (Triton lets its in-flight requests finish)."""
        self._call(f"unloading {name}", self.client.unload_model, name)

    def index(self) -> list[dict]:
        """Triton's repository index: every model folder with its state."""
        return self._call("an index request", self.client.get_model_repository_index)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()


@dataclass
class ReloadResult:
    """A finished switch: what serves now, what was retired, and how long the phases took."""

    target: StepNames
    previous: StepNames | None
    retired: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # prepare, switch, retire, total
    switched_at: float = 0.0  # time.monotonic() when Triton confirmed the new ensemble


def _reason(error: Exception) -> str:
    message = error.message() if hasattr(error, "message") else str(error)  # InferenceServerException
    return " ".join(str(message).split())


def apply_plan(plan: ReloadPlan, repository: Path, triton: ModelControl) -> ReloadResult:
    """Carry out ``plan`` on a live Triton whose repository is ``repository`` (the step folders are written).

    Before the switch a failure undoes what this plan loaded and wrote and raises
    :class:`ReloadError` naming the model: the revision serving before keeps serving. After the
    switch, clean-up failures are logged, never raised: the new revision is serving.
    """
    from tritonclient.utils import InferenceServerException

    repository = Path(repository)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    loaded: list[str] = []
    try:
        for name in plan.prepare:
            try:
                triton.load(name)
            except InferenceServerException as error:
                raise ReloadError(name, _reason(error)) from None
            loaded.append(name)
    except (ReloadError, TritonUnreachable):
        _undo(plan, repository, triton, loaded)
        raise
    seconds["prepare"] = time.monotonic() - started
    switching = time.monotonic()
    try:
        triton.load(c.ENSEMBLE, plan.ensemble)
    except InferenceServerException as error:
        _undo(plan, repository, triton, loaded)  # Triton keeps the old ensemble after a failed reload
        raise ReloadError(c.ENSEMBLE, _reason(error)) from None
    except TritonUnreachable:
        # The answer was lost, not necessarily the switch: undoing a switch that happened would unload
        # the steps now serving. Undo only when Triton says the old ensemble still serves; otherwise
        # the next attempt finds out (and retires what is left over).
        if _switched(triton, plan.target) is False:
            _undo(plan, repository, triton, loaded)
        raise
    switched_at = time.monotonic()
    seconds["switch"] = switched_at - switching
    # Persist the switch only once Triton made it, so that a restarted server comes up on what served.
    write_ensemble(repository, plan.ensemble)
    retiring = time.monotonic()
    _retire(plan.retire, repository, triton)
    seconds["retire"] = time.monotonic() - retiring
    seconds["total"] = time.monotonic() - started
    return ReloadResult(plan.target, plan.previous, plan.retire, seconds, switched_at)


def _switched(triton: ModelControl, target: StepNames) -> bool | None:
    """Whether the live ensemble serves ``target``; ``None`` when Triton does not say."""
    try:
        return triton.serving_steps() == target
    except TritonUnreachable:
        return None


def _retire(names: Iterable[str], repository: Path, triton: ModelControl) -> None:
    """Unload models no ensemble points at any more, then delete their folders.

    Triton's unload returns at once and lets in-flight requests finish on the model; the stub
    processes hold everything they read, so the folders can go right away.
    """
    from tritonclient.utils import InferenceServerException

    for name in names:
        try:
            triton.unload(name)
        except (InferenceServerException, TritonUnreachable) as error:
            log.warning("unloading %s after the switch failed: %s", name, _reason(error))
    for name in names:
        shutil.rmtree(repository / name, ignore_errors=True)


def _undo(plan: ReloadPlan, repository: Path, triton: ModelControl, loaded: list[str]) -> None:
    """Unload and delete the target's steps after a failed attempt; the serving revision is untouched."""
    from tritonclient.utils import InferenceServerException

    for name in plan.target.all:
        # Not only the loaded ones: Triton holds a model that failed as UNAVAILABLE until unloaded.
        try:
            triton.unload(name)
        except (InferenceServerException, TritonUnreachable) as error:
            if name in loaded:
                log.warning("undoing %s: unload failed: %s", name, _reason(error))
        shutil.rmtree(repository / name, ignore_errors=True)


def _steps_on_disk(repository: Path) -> StepNames | None:
    """The steps the folder's ensemble config names (what a restarted Triton would load), if readable."""
    try:
        return ensemble_steps(read_config(repository / c.ENSEMBLE / "config.pbtxt"))
    except (OSError, RepositoryError, text_format.ParseError):
        return None


def hot_reload(
    repository: Path, model: ExportedModel, revision: str, triton: ModelControl
) -> ReloadResult | None:
    """Export ``model`` into the live ``repository`` as ``revision`` and switch Triton to it.

    Returns ``None`` when that revision is already serving (nothing to do); raises
    :class:`ReloadError` (the previous revision keeps serving) or :class:`TritonUnreachable`.
    """
    repository = Path(repository)
    target = StepNames.for_revision(revision)
    previous = triton.serving_steps()
    folders = [p.name for p in repository.iterdir() if p.is_dir()] if repository.is_dir() else []
    if previous == target:
        # Serving already. After an attempt whose answer was lost once Triton had switched, the
        # folder's ensemble config still names the old steps and their folders are left: settle both.
        if _steps_on_disk(repository) != target:
            write_ensemble(repository, ensemble_config(model.serving, target))
        _retire(leftovers(target, folders), repository, triton)
        return None
    plan = plan_reload(previous, target, model.serving, folders)
    write_steps(model, repository, target)
    return apply_plan(plan, repository, triton)


# --- the watch file and the sidecar ---------------------------------------------------------


class WatchFileError(ValueError):
    """The watch file's content is not ``{"revision": "...", "model": "..."}``."""


@dataclass(frozen=True)
class WatchTarget:
    """What the watch file asks to serve."""

    revision: str
    model: Path


def parse_watch_file(text: str) -> WatchTarget:
    """Parse ``{"revision": "<non-empty string>", "model": "<exported model directory>"}``; extra keys are ignored."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise WatchFileError(f"not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(document, dict):
        raise WatchFileError(f"expected a JSON object, got {type(document).__name__}")
    for key in ("revision", "model"):
        if key not in document:
            raise WatchFileError(f"missing key '{key}'")
        if not isinstance(document[key], str) or not document[key].strip():
            raise WatchFileError(f"'{key}' must be a non-empty string, got {document[key]!r}")
    return WatchTarget(document["revision"], Path(document["model"]))


class Reloader:
    """Watch a JSON file and hot-reload Triton to the revision it names.

    The file is re-read by content every ``interval`` seconds (a ConfigMap volume swaps a symlink,
    so mtimes say nothing useful). A failed reload is logged and retried, with a back-off that
    grows to ``max_backoff`` while the content stays the same; bad content is logged once and
    waits for the next change.
    """

    def __init__(
        self,
        watch: Path,
        repository: Path,
        triton: ModelControl,
        serving: ServingSpec | None = None,
        gpu: bool | None = None,
        max_backoff: float = 60.0,
    ) -> None:
        self.watch = Path(watch)
        self.repository = Path(repository)
        self.triton = triton
        self.serving = serving
        self.gpu = gpu
        self.max_backoff = max_backoff
        self._settled: str | None = None  # content that is served, or refused for good
        self._attempted: str | None = None  # content of the last attempt (back-off applies to it)
        self._failures = 0
        self._retry_at = 0.0
        self._last_message: str | None = None
        self.reloads: list[ReloadResult] = []

    def _report(self, message: str) -> None:
        """Log an error once while it stays the same (a file polled every few seconds must not flood the log)."""
        if message != self._last_message:
            log.error("%s", message)
            self._last_message = message

    def poll(self, now: float | None = None) -> str:
        """Read the file once and act on it. Returns what happened, for tests and the loop:
        ``unchanged``, ``waiting`` (back-off), ``invalid``, ``serving`` (already), ``reloaded`` or ``failed``."""
        now = time.monotonic() if now is None else now
        try:
            text = self.watch.read_text()
        except OSError as error:
            self._report(f"cannot read watch file {self.watch}: {error.strerror or error}")
            return "invalid"
        if text == self._settled:
            return "unchanged"
        if text != self._attempted:
            self._attempted, self._failures, self._retry_at = text, 0, 0.0
        elif now < self._retry_at:
            return "waiting"
        try:
            target = parse_watch_file(text)
        except WatchFileError as error:
            self._report(f"watch file {self.watch}: {error}; still serving the previous revision")
            self._settled = text  # only a new content can fix it
            return "invalid"
        try:
            model = check_model(target.model, self.gpu, self.serving)
            result = hot_reload(self.repository, model, target.revision, self.triton)
        except (RepositoryError, ReloadError, TritonUnreachable, OSError) as error:
            self._failures += 1
            delay = min(self.max_backoff, 2.0 ** (self._failures - 1))
            self._retry_at = now + delay
            log.error(
                "reload to revision %s failed (attempt %d, retry in >= %.0f s; the previous revision serves on): %s",
                target.revision, self._failures, delay, error,
            )
            self._last_message = None
            return "failed"
        self._settled, self._last_message = text, None
        if result is None:
            log.info("revision %s is serving (%s)", target.revision, StepNames.for_revision(target.revision).ranker)
            return "serving"
        self.reloads.append(result)
        was = result.previous.revision if result.previous else "nothing"
        log.info(
            "reloaded %s: %s -> %s from %s in %.1f s (load %.1f s, switch %.3f s, retire %.1f s); retired %s",
            c.ENSEMBLE, was, result.target.revision, target.model, result.seconds["total"],
            result.seconds["prepare"], result.seconds["switch"], result.seconds["retire"],
            ", ".join(result.retired) or "nothing",
        )
        return "reloaded"

    def run(self, stop: threading.Event, interval: float = 5.0) -> None:
        """Poll until ``stop`` is set (SIGTERM); a reload in progress finishes first."""
        log.info("watching %s every %.1f s for %s (repository %s)", self.watch, interval, c.ENSEMBLE, self.repository)
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # the sidecar must outlive any surprise: log it, try again next time
                log.exception("unexpected error while polling %s", self.watch)
            stop.wait(interval)
        log.info("reloader stopped")
