"""``recops demo``: the whole loop on one machine, with the real components.

1. data: the synthetic shop log (or MovieLens-100K), prepared once;
2. models: a control and a treatment (``recops.demo.models``), trained, evaluated, exported;
3. serving: one real Triton per model (``recops export`` repositories), the router in front (its
   config written from the rollout's current weights, reloaded by the router on change), and a real
   Prometheus scraping the router when the ``prometheus`` binary is on PATH — otherwise the gates
   read the router's own ``/metrics`` (``RouterScrapeClient``);
4. the experiment: simulated users (``recops.demo.simulation``) whose clicks, likes and purchases
   follow the generator's hidden preferences (MovieLens: the held-out ratings) keep visiting, while
   the RecExperiment's steps and gates run through ``recops.experiments.rollout`` — the same step
   machine and gates the operator uses — until it promotes, rolls back, or the time budget ends;
5. ``report.html``, PNG plots and ``summary.json`` in the output folder.

Every child process (Tritons, router, Prometheus) is stopped on exit, on error and on Ctrl-C, and
dies with this process if it is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from recops.api.loading import SpecError, load_recexperiment_spec
from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.routing import CONTROL, TREATMENT, router_config

SETTLE_S = 2.0  # two Prometheus scrape intervals (1 s each) after the router confirms new weights
DEFAULT_EXPERIMENT = Path(__file__).with_name("recexperiment-demo.yaml")


STOP_REQUESTED = threading.Event()
"""Set by the CLI's SIGINT/SIGTERM handler, which also raises KeyboardInterrupt. The exception can be
lost (raised inside a fork handler while a server starts, Python prints "Exception ignored"), so the
demo also checks this flag between steps and at every look."""


def raise_if_stopped() -> None:
    """KeyboardInterrupt when a stop was requested and its exception went missing."""
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt


class DemoError(RuntimeError):
    """The demo cannot run or go on; the message says what was wrong."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``recops demo`` was asked to do."""

    out: Path
    dataset: Literal["synthetic", "ml-100k"] = "synthetic"
    data_dir: Path | None = None
    experiment: Path = DEFAULT_EXPERIMENT
    quick: bool = False
    worse_treatment: bool = False
    budget_s: float = 420.0
    seed: int = 0
    concurrency: int = 16


@dataclass
class Look:
    """One evaluation of the gates."""

    t_s: float
    step: int
    weight_pct: float
    phase: str
    results: list[dict[str, Any]] = field(default_factory=list)


def load_experiment(path: Path, quick: bool) -> RecExperimentSpec:
    """The RecExperiment to run; ``quick`` halves its pauses and look interval (CI)."""
    try:
        spec = load_recexperiment_spec(path)
    except SpecError as error:
        raise DemoError(str(error)) from None
    if not quick:
        return spec
    document = spec.model_dump(by_alias=True, mode="json")
    for step in document["steps"]:
        step["pause"] = _halve(step["pause"])
    document["analysis"]["interval"] = _halve(document["analysis"]["interval"])
    return RecExperimentSpec.model_validate(document)


def _halve(duration: str | float) -> str:
    from recops.api.recexperiment import parse_duration

    return f"{max(1, round(parse_duration(duration) / 2))}s"


def check_options(options: DemoOptions) -> RecExperimentSpec:
    """Refuse bad input before anything starts."""
    if options.dataset == "ml-100k":
        if options.data_dir is None:
            raise DemoError("--dataset ml-100k needs --data-dir PATH (the folder holding u.data and u.item)")
        if not (options.data_dir / "u.data").is_file():
            raise DemoError(f"--data-dir {options.data_dir}: no u.data there (MovieLens-100K's ratings file)")
    if not options.experiment.is_file():
        raise DemoError(f"--experiment {options.experiment}: no such file")
    spec = load_experiment(options.experiment, options.quick)
    if options.out.exists() and not options.out.is_dir():
        raise DemoError(f"--out {options.out} is a file, not a folder")
    return spec


@contextlib.contextmanager
def services(
    model_dirs: dict[str, Path], work: Path, router_config: Callable[[dict[str, str]], dict], say: Callable[[str], None]
) -> Iterator[dict[str, Any]]:
    """Tritons (one per arm), the router, and Prometheus when available; all stopped on exit."""
    from recops.experiments.prometheus_server import PrometheusProcess, poll, prometheus_binary
    from recops.serving.processes import free_port
    from recops.serving.repository import RepositoryError, build_repository
    from recops.serving.router.process import RouterProcess, RouterProcessError
    from recops.serving.triton_server import TritonError, TritonServer

    with contextlib.ExitStack() as stack:
        endpoints = {}
        for arm, model_dir in model_dirs.items():
            try:
                repo = build_repository(model_dir, work / f"triton-{arm}")
                triton = stack.enter_context(TritonServer(repo, log_path=work / f"triton-{arm}.log"))
            except (RepositoryError, TritonError) as error:
                raise DemoError(f"Triton for the {arm} did not start: {error}") from None
            endpoints[arm] = triton.grpc_url
            say(f"triton ({arm}) ready on {triton.grpc_url}")
        config_path = work / "router.yaml"
        config_path.write_text(yaml.safe_dump(router_config(endpoints), sort_keys=False))
        router = RouterProcess(config_path, free_port(), work / "router.log")
        stack.callback(router.stop)
        try:
            router.wait_ready()
        except RouterProcessError as error:
            raise DemoError(str(error)) from None
        say(f"router ready on {router.url}")
        raise_if_stopped()
        prometheus = None
        binary = prometheus_binary()
        if binary:
            prometheus = PrometheusProcess(binary, work / "prometheus", [f"127.0.0.1:{router.port}"])
            try:
                prometheus.start()
            except RuntimeError as error:
                raise DemoError(str(error)) from None
            stack.callback(prometheus.stop)
            # Prometheus applies its targets a few seconds after start: traffic before its first
            # scrape of the router would be missing from every increase().
            poll(lambda: any(s["value"][1] == "1" for s in prometheus.query("up")), 30,
                 "Prometheus to scrape the router")
            say(f"gates read a real Prometheus ({binary}) on {prometheus.url}")
        else:
            say("gates read the router's own /metrics (no prometheus binary on PATH; apt-get install prometheus)")
        raise_if_stopped()
        yield {"endpoints": endpoints, "router": router, "config_path": config_path, "prometheus": prometheus}


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, as a ConfigMap update does: the router never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def seconds_since(origin: float) -> float:
    return time.monotonic() - origin


async def wait_until(deadline: float, stop: asyncio.Event) -> None:
    """Sleep until ``deadline`` (monotonic) or until ``stop`` is set."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation (Ctrl-C) that
    # arrives as the inner wait completes, and the experiment would run on to its budget.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await stop.wait()


def http_client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits)


def _dataset(options: DemoOptions) -> tuple[dict[str, Any], Any]:
    """``spec.data`` for both models, and the simulated users' behaviour source."""
    from recops.demo.models import movielens_data_spec, synthetic_data_spec

    if options.dataset == "ml-100k":
        return movielens_data_spec(str(options.data_dir)), None
    data_spec = synthetic_data_spec(options.quick, options.seed)
    from recops.data.synthetic import SyntheticConfig, generate

    size = data_spec["synthetic"]
    shop = generate(SyntheticConfig(n_users=size["users"], n_items=size["items"], days=size["days"], seed=options.seed))
    return data_spec, shop


VISITS_PER_USER = 30
"""Each shopper of the dataset visits under this many distinct visitor ids (``U00042~7``)."""


class Visitors:
    """A shopper's behaviour under many visitor ids: new users keep arriving all through the ramp.

    The router counts a user once per experiment, and the sample-ratio gate reads the users new in
    the current step; with only the dataset's few hundred shoppers every one of them is seen in the
    first seconds and later steps would have no new users to test. Real shops have a stream of new
    visitors; this gives the simulation one, each behaving exactly like the shopper it copies.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def reactions(self, user_id: str, item_ids: Any) -> Any:
        return self.inner.reactions(user_id.split("~", 1)[0], item_ids)


def visitors(users: Any, copies: int = VISITS_PER_USER) -> Any:
    """``users`` with each shopper repeated under ``copies`` visitor ids (same history)."""
    from recops.demo.simulation import SimulatedUsers

    return SimulatedUsers(
        user_ids=tuple(f"{user}~{copy}" for copy in range(copies) for user in users.user_ids),
        histories=tuple(history for _ in range(copies) for history in users.histories),
    )


def train_models(options: DemoOptions, say: Callable[[str], None]) -> tuple[dict[str, Path], dict, Any, Any]:
    """Train, evaluate and export the control and the treatment; returns model dirs, offline metrics, data, shop."""
    from recops.data.prepare import prepare
    from recops.demo.models import demo_models
    from recops.training.run import TrainingFailed, evaluate_baselines, run_training

    data_spec, shop = _dataset(options)
    models = demo_models(data_spec, options.quick, options.worse_treatment, options.seed)
    say("preparing the data")
    try:
        data = prepare(models.control.data, seed=options.seed)
    except (OSError, ValueError) as error:
        raise DemoError(f"data: {error}") from None
    offline: dict[str, dict[str, float]] = {}
    dirs = {}
    for arm, spec in ((CONTROL, models.control), (TREATMENT, models.treatment)):
        say(f"training the {arm} ({spec.backbone.name})")
        try:
            summary = run_training(spec, options.out / "models" / arm, restart=True, baselines=(), data=data)
        except TrainingFailed as error:
            raise DemoError(f"training the {arm} failed: {error}") from None
        offline[f"{arm} ({spec.backbone.name})"] = summary["metrics"]["twotower"]
        dirs[arm] = options.out / "models" / arm
    offline.update(evaluate_baselines(data, ["pop", "itemcf"], seed=options.seed))
    return dirs, offline, data, shop


def router_config_for(spec: RecExperimentSpec, weights_bp: int, feedback: Path) -> Callable[[dict[str, str]], dict]:
    """The router config (as a dict) for these Triton endpoints at a treatment weight."""
    limits = {"maxInFlight": 100_000, "upstreamTimeoutSeconds": 10}
    return lambda endpoints: router_config("recops-demo", spec, weights_bp, endpoints, str(feedback), limits)


async def run_experiment(
    spec: RecExperimentSpec,
    running: dict[str, Any],
    users: Any,
    behaviour: Any,
    options: DemoOptions,
    say: Callable[[str], None],
) -> tuple[Any, Any, list[Look], list[dict[str, Any]]]:
    """Simulated traffic in the background; looks at the gates on the spec's interval; router weights
    rewritten whenever the rollout moves. Returns (final state, simulation result, looks, steps)."""
    import numpy as np

    from recops.demo.simulation import simulate
    from recops.experiments import rollout
    from recops.experiments.gates import evaluate_gates
    from recops.experiments.prometheus import PrometheusClient
    from recops.experiments.scrape import RouterScrapeClient

    router = running["router"]
    prometheus = running["prometheus"]
    gates_client: Any = (
        PrometheusClient(prometheus.url, timeout=5.0) if prometheus else RouterScrapeClient(router.url)
    )
    if not prometheus:
        gates_client.scrape()  # the counters' zero point: windows are differences from here
    origin = time.monotonic()
    state = rollout.start(spec, time.time())
    looks: list[Look] = []
    steps: list[dict[str, Any]] = [{"index": 0, "weight_pct": spec.steps[0].weight, "started_s": 0.0}]
    stop = asyncio.Event()
    deadline = origin + options.budget_s
    latest: dict[str, Any] = {}  # the simulation's newest snapshot, for the live line per arm
    async with http_client(router.url, options.concurrency) as client:
        traffic = asyncio.create_task(simulate(
            client, users, behaviour, rng=np.random.default_rng(options.seed), concurrency=options.concurrency,
            stop=stop, on_tick=lambda snapshot: latest.update(result=snapshot), origin=origin,
        ))
        try:
            while not state.terminal and time.monotonic() < deadline:
                raise_if_stopped()
                look_at = rollout.next_look_at(spec, state)
                if look_at is None:
                    break
                await wait_until(time.monotonic() + max(0.0, look_at - time.time()), traffic_done(traffic))
                if traffic.done():
                    traffic.result()  # the simulation failed: raise its error here
                now = time.time()
                context = rollout.gate_context(spec, state, "recops-demo", now,
                                               treatment_arm=TREATMENT, control_arm=CONTROL)
                results = await asyncio.to_thread(evaluate_gates, spec.gates, gates_client, context)
                before = rollout.treatment_weight_bp(spec, state)
                state = rollout.observe(spec, state, results, now)
                weight = rollout.treatment_weight_bp(spec, state)
                looks.append(Look(seconds_since(origin), state.step, weight / 100, str(state.phase),
                                  [_result_json(r) for r in results]))
                say(_look_line(looks[-1]))
                if "result" in latest:
                    say(_arms_line(latest["result"]))
                if weight != before:
                    steps[-1]["ended_s"] = seconds_since(origin)
                    steps.append({"index": state.step, "weight_pct": weight / 100, "started_s": seconds_since(origin),
                                  "decision": str(state.phase)})
                    await asyncio.to_thread(write_weights, running["config_path"], router.url, weight)
                    # The step starts once every counter scraped in its window was counted under the new
                    # weights: the reload is confirmed, plus two scrape intervals of margin.
                    state = rollout.weights_applied(state, time.time() + SETTLE_S)
        finally:
            stop.set()
            simulation = await traffic
            steps[-1].setdefault("ended_s", seconds_since(origin))
            if hasattr(gates_client, "close"):
                gates_client.close()
    return state, simulation, looks, steps


def traffic_done(task: asyncio.Task) -> asyncio.Event:
    """An event set when the traffic task ends (so a failed simulation ends the wait at once)."""
    event = asyncio.Event()
    task.add_done_callback(lambda _: event.set())
    if task.done():
        event.set()
    return event


def write_weights(config_path: Path, router_url: str, treatment_bp: int, timeout_s: float = 30.0) -> None:
    """Move users between the arms: rewrite the router config and wait until the router serves it."""
    from recops.experiments.prometheus_server import poll
    from recops.serving.router.config import digest_of

    config = yaml.safe_load(config_path.read_text())
    config["arms"][0]["weightBp"] = treatment_bp
    config["arms"][1]["weightBp"] = 10_000 - treatment_bp
    text = yaml.safe_dump(config, sort_keys=False)
    write_atomically(config_path, text)
    live = f'recops_router_config_info{{experiment="recops-demo",hash="{digest_of(text.encode())}"}} 1.0'
    poll(lambda: live in httpx.get(f"{router_url}/metrics", timeout=5).text, timeout_s,
         "the router to load the new weights")


def _result_json(result: Any) -> dict[str, Any]:
    return {"gate": result.gate, "verdict": str(result.verdict), "value": result.value, "message": result.message}


def _arms_line(result: Any) -> str:
    parts = []
    for arm in (TREATMENT, CONTROL):
        stats = result.arms.get(arm)
        if stats is not None:
            low, high = stats.ctr_interval
            parts.append(f"{arm}: {stats.requests} views, CTR {100 * stats.ctr:.2f}% "
                         f"[{100 * low:.2f}, {100 * high:.2f}], GMV/user {stats.gmv_per_user:.2f}")
    return "           " + " | ".join(parts)


def _look_line(look: Look) -> str:
    verdicts = ", ".join(f"{r['gate']} {r['verdict']}" for r in look.results)
    return f"[{look.t_s:5.1f} s] step {look.step + 1} at {look.weight_pct:g}% → {look.phase}: {verdicts}"


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole loop; returns the summary also written to ``summary.json``."""
    from recops.demo.simulation import MovieLensBehaviour, SimulatedUsers, SyntheticBehaviour
    from recops.experiments import rollout

    started = time.monotonic()
    spec = check_options(options)
    options.out.mkdir(parents=True, exist_ok=True)
    model_dirs, offline, data, shop = train_models(options, say)
    users = visitors(SimulatedUsers.from_interactions(data))
    shoppers = SyntheticBehaviour(shop) if shop is not None else MovieLensBehaviour.from_interactions(data)
    behaviour = Visitors(shoppers)
    work = options.out / "run"
    work.mkdir(parents=True, exist_ok=True)
    first_weight = rollout.treatment_weight_bp(spec, rollout.start(spec, 0.0))
    config = router_config_for(spec, first_weight, work / "feedback" / "feedback.jsonl")
    with services(model_dirs, work, config, say) as running:
        gates_source = "prometheus" if running["prometheus"] else "router /metrics"
        state, simulation, looks, steps = asyncio.run(run_experiment(spec, running, users, behaviour, options, say))
    decision = {rollout.Phase.PROMOTED: "promoted", rollout.Phase.ROLLED_BACK: "rolled_back"}.get(state.phase, "held")
    summary = {
        "decision": decision,
        "winner": {"promoted": TREATMENT, "rolled_back": CONTROL}.get(decision),
        "phase": str(state.phase),
        "reason": state.message,
        "steps": steps,
        "gates": {look_result["gate"]: look_result for look_result in (looks[-1].results if looks else [])},
        "looks": [vars(look) for look in looks],
        "offline": offline,
        "online": simulation.to_json(),
        "gates_source": gates_source,
        "dataset": options.dataset,
        "quick": options.quick,
        "seconds": time.monotonic() - started,
    }
    from recops.demo.report import write_report, write_summary

    write_summary(options.out, summary)
    report = write_report(options.out, summary, simulation, steps, _gate_history(looks), offline)
    say(f"decision: {decision}; report: {report}; summary: {options.out / 'summary.json'}")
    return summary


def _gate_history(looks: list[Look]) -> list[dict[str, Any]]:
    return [
        {"t_s": look.t_s, "step": look.step, **result}
        for look in looks
        for result in look.results
    ]
