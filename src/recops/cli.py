"""The ``recops`` command line. Thin: parse, call the library, print."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recops.api.loading import SpecError, load_recmodel_spec
from recops.api.recmodel import RecModelSpec

app = typer.Typer(
    help="recops: behaviour logs → LLM two-tower recommender → Triton → A/B rollouts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # never wrap a file path in an error


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code=2)


SpecFile = Annotated[Path, typer.Option("--file", "-f", help="RecModel manifest or its spec (YAML).")]


def _read_spec(file: Path) -> RecModelSpec:
    try:
        return load_recmodel_spec(file)
    except SpecError as error:
        raise _fail(str(error)) from None


def _baseline_names(text: str) -> list[str]:
    from recops.models.baselines import BASELINES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise _fail(f"--baselines: unknown {', '.join(unknown)}; known: {', '.join(sorted(BASELINES))}")
    return names


@app.command()
def train(
    file: SpecFile,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoints and the exported model).")],
    restart: Annotated[bool, typer.Option(help="Discard a checkpoint in --out instead of resuming it.")] = False,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated baselines to evaluate beside the model ('' for none).")
    ] = "pop,itemcf,ease,tfidf",
) -> None:
    """Prepare data, train the two-tower model, evaluate it and export the model directory."""
    spec = _read_spec(file)
    names = _baseline_names(baselines)
    from recops.training.run import TrainingFailed, run_training

    try:
        summary = run_training(spec, out, restart=restart, baselines=names)
    except TrainingFailed as error:
        raise _fail(str(error)) from None
    if "metrics" not in summary:  # a torchrun worker other than rank 0: rank 0 exports and reports
        return
    _print_metrics(summary["metrics"])
    console.print(f"model: {out}\nreport: {out / 'report.html'}")
    _write_termination_message({"metrics": reported_metrics(summary)})


@app.command()
def prepare(file: SpecFile) -> None:
    """Load and clean the spec's data; print the drop counts and the split sizes."""
    spec = _read_spec(file)
    from recops.data.io import DataFormatError
    from recops.data.prepare import index_logs, load_logs

    try:
        logs = load_logs(spec.data)
        data = index_logs(logs, spec.data.split, spec.training.seed, spec.data.cold_item_fraction)
    except (DataFormatError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(json.dumps({"rows_read": logs.rows_read, "drops": data.drops, **data.summary()}, indent=2))


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Triton model repository to write.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Exported model directory (train --out DIR).")
    ] = None,
    gpu: Annotated[
        bool | None, typer.Option("--gpu/--cpu", help="Ranker on KIND_GPU or KIND_CPU (default: the spec's GPUs).")
    ] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", help="RecModel whose serving settings to use (default: those it was trained with)."),
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option(help="Name the steps recops_<step>_<REVISION> (hot-reloadable; see 'recops serve reloader')."),
    ] = None,
    revision_file: Annotated[
        Path | None,
        typer.Option(help='Take --model and --revision from this JSON file, {"revision": ..., "model": ...} '
                     "(what the reloader watches; the Triton pods' init container reads it)."),
    ] = None,
) -> None:
    """Write the Triton model repository (ensemble of preprocess, ranker, postprocess) of a model."""
    from recops.serving.hot_reload import WatchFileError, parse_watch_file
    from recops.serving.repository import RepositoryError, build_repository

    if revision_file is not None:
        if model is not None or revision is not None:
            raise _fail("--revision-file names the model and the revision: give it without --model and --revision")
        try:
            target = parse_watch_file(revision_file.read_text())
        except (OSError, WatchFileError) as error:
            raise _fail(f"--revision-file {revision_file}: {error}") from None
        model, revision = target.model, target.revision
    if model is None:
        raise _fail("give --model (an exported model directory) or --revision-file")
    serving = _read_spec(spec_file).serving if spec_file is not None else None
    try:
        build_repository(model, out, gpu=gpu, serving=serving, revision=revision)
    except RepositoryError as error:
        raise _fail(str(error)) from None
    console.print(f"triton repository: {out}")


# The feature check's thresholds (recops.data.feature_check.FeatureCheckConfig), for check-features and retrain.
PsiThreshold = Annotated[float, typer.Option(help="Largest population stability index per column.")]
MaxOutOfRange = Annotated[float, typer.Option(help="Largest share of values outside training's range.")]
MaxNullChange = Annotated[float, typer.Option(help="Largest change in a column's share of missing values.")]


def _print_findings(findings) -> None:
    for finding in findings:
        mark = "[green]ok[/]" if finding.passed else "[bold red]MISMATCH[/]"
        console.print(f"{mark} {finding.column} {finding.check}: {finding.detail}", highlight=False)


@app.command("check-features")
def check_features_command(
    training: Annotated[Path, typer.Option(help="Events the model was trained on (JSONL, CSV, Parquet).")],
    online: Annotated[Path, typer.Option(help="The online log to train on next (the router's feedback log).")],
    psi_threshold: PsiThreshold = 0.2,
    max_out_of_range: MaxOutOfRange = 0.01,
    max_null_change: MaxNullChange = 0.1,
    report: Annotated[Path | None, typer.Option("--report", help="Write the findings as JSON here.")] = None,
) -> None:
    """Refuse to retrain when the online log no longer matches the training data (exit 1, naming the columns)."""
    from recops.data.feature_check import FeatureCheckConfig, check_features, read_log
    from recops.data.io import DataFormatError

    try:
        config = FeatureCheckConfig(psi_threshold, max_out_of_range, max_null_change)
        result = check_features(read_log(training), read_log(online), config)
    except (ValueError, DataFormatError) as error:
        raise _fail(str(error)) from None
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    _print_findings(result.findings)
    if not result.ok:
        columns = ", ".join(sorted({f.column for f in result.failed}))
        console.print(f"[bold red]refusing to train:[/] the online log differs from the training data in {columns}")
        raise typer.Exit(code=1)
    console.print(f"the online log ({result.online_rows} rows) matches the training data ({result.training_rows} rows)")


def reported_metrics(summary: dict) -> dict:
    """The model's metrics and serving cost (``serving.*``) for the RecModel status; a distilled student's
    teacher's beside them (``teacher.*``, ``teacher.serving.*``), so quality and cost compare side by side."""
    teacher = summary.get("teacher") or {}
    parts = {
        "": summary["metrics"]["twotower"],
        "serving.": summary.get("serving"),
        "teacher.": teacher.get("metrics"),
        "teacher.serving.": teacher.get("serving"),
    }
    return {f"{prefix}{name}": value for prefix, values in parts.items() for name, value in (values or {}).items()}


def _write_termination_message(message: dict) -> None:
    """The trainer image's termination message: the operator copies it into the RecModel status."""
    termination_log = os.environ.get("RECOPS_TERMINATION_LOG")
    if termination_log:
        Path(termination_log).write_text(json.dumps(message, default=float))


def _pull_into_store(uri: str, store: Path | None) -> Path:
    """Append a Kafka feedback topic's new events to the store, which retrain then reads whole: the offsets
    move only after the events are on disk, and the store keeps them whatever becomes of this retrain."""
    from recops.data.io import parse_kafka_uri
    from recops.training.feedback_pull import PullError, pull_feedback

    if store is None:
        raise _fail("--feedback kafka://... needs --feedback-store DIR (where pulled events are kept)")
    try:
        source = parse_kafka_uri(uri)
        store.mkdir(parents=True, exist_ok=True)
        result = pull_feedback(source.bootstrap_servers, source.topic, source.group or "recops-retrain",
                               store / f"{source.topic}.jsonl")
    except (ValueError, PullError) as error:
        raise _fail(f"--feedback: {error}") from None
    except OSError as error:
        raise _fail(f"--feedback-store: cannot write {store}: {error.strerror or error}") from None
    console.print(f"pulled {result.events} new events from {source.topic} into {store}")
    return store


@app.command()
def retrain(
    file: SpecFile,
    previous: Annotated[Path, typer.Option(help="The last revision's model directory (train --out DIR).")],
    feedback: Annotated[str, typer.Option(
        help="The router's feedback log: a JSONL file or a folder of them (file://, pvc:// or a path), or "
        "kafka://HOST:PORT/TOPIC?group=G (pulled into --feedback-store first).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory of the new revision.")],
    min_new_events: Annotated[int, typer.Option(
        min=0, help="Train only when the feedback holds at least this many events the last revision lacks.")] = 0,
    feedback_store: Annotated[Path | None, typer.Option(
        help="With a kafka:// feedback: the folder the topic's new events are appended to before training; "
        "it keeps every pulled event, so a refused or failed retrain loses none.")] = None,
    psi_threshold: PsiThreshold = 0.2,
    max_out_of_range: MaxOutOfRange = 0.01,
    max_null_change: MaxNullChange = 0.1,
) -> None:
    """The next revision: check the feedback log, merge it with the training events, train from --previous."""
    spec = _read_spec(file)
    from recops.data.feature_check import FeatureCheckConfig
    from recops.data.io import DataFormatError
    from recops.training.retrain import RetrainRefused, run_retrain
    from recops.training.run import TrainingFailed

    if not previous.is_dir():
        raise _fail(f"--previous: not a directory: {previous} (the last revision's model directory)")
    if feedback.startswith("kafka://"):
        feedback = str(_pull_into_store(feedback, feedback_store))
    try:
        config = FeatureCheckConfig(psi_threshold, max_out_of_range, max_null_change)
        record = run_retrain(spec, previous, feedback, out, config, min_new_events=min_new_events)
    except RetrainRefused as refused:
        _print_findings(refused.report.failed)
        console.print(f"[bold red]refusing to train:[/] {refused} (report: {out / 'retrain.json'})")
        raise typer.Exit(code=1) from None
    except (ValueError, DataFormatError, TrainingFailed) as error:
        raise _fail(str(error)) from None
    counts = record["events"]
    if "skipped" in record:
        console.print(f"nothing to retrain: {record['skipped']}")
        _write_termination_message({"skipped": record["skipped"], "events": counts})
        return
    console.print(
        f"events: {counts['training']} training + {counts['feedback']} feedback - {counts['duplicates']} "
        f"logged twice = {counts['merged']} ({counts['new']} new); warm start from {previous}"
    )
    _print_metrics(record["metrics"])
    console.print(f"model: {out}\nreport: {out / 'report.html'}")
    _write_termination_message({"metrics": reported_metrics(record), "events": counts})


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: models, logs, report.html, summary.json.")],
    quick: Annotated[bool, typer.Option(help="Small data and halved pauses (about 2 minutes; CI).")] = False,
    dataset: Annotated[str, typer.Option(help="synthetic (the built-in shop) or ml-100k.")] = "synthetic",
    data_dir: Annotated[Path | None, typer.Option(help="MovieLens-100K folder (with --dataset ml-100k).")] = None,
    experiment: Annotated[
        Path | None, typer.Option(help="RecExperiment YAML to run (default: the demo's own).")
    ] = None,
    worse_treatment: Annotated[
        bool, typer.Option(help="Make the treatment the weaker model: the rollout should roll back.")
    ] = False,
    budget: Annotated[float, typer.Option(min=10, help="Seconds the experiment may run before it is held.")] = 420,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """The whole loop on this machine: train two models, serve both with Triton behind the router, run a
    RecExperiment with simulated users and real gates, promote or roll back, write the report."""
    from recops.demo.run import DEFAULT_EXPERIMENT, DemoError, DemoOptions, run_demo

    if dataset not in ("synthetic", "ml-100k"):
        raise _fail(f"--dataset: expected synthetic or ml-100k, got {dataset!r}")
    options = DemoOptions(
        out=out.resolve(), dataset=dataset, data_dir=data_dir, experiment=experiment or DEFAULT_EXPERIMENT, quick=quick,  # type: ignore[arg-type]
        worse_treatment=worse_treatment, budget_s=budget, seed=seed,
    )
    _interrupt_on_stop_signals()
    try:
        run_demo(options, say=lambda line: console.print(line, highlight=False, markup=False))
    except DemoError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        console.print("interrupted: every server was stopped")
        raise typer.Exit(code=130) from None


def _interrupt_on_stop_signals() -> None:
    """Ctrl-C and SIGTERM both stop the demo through its cleanup (KeyboardInterrupt).

    Set explicitly: a process started in the background by a non-interactive shell inherits SIGINT
    ignored, and would otherwise run on after ``kill -INT``. The handler also sets the demo's
    ``STOP_REQUESTED``, which the demo checks between steps: an exception raised while a child is
    being forked is swallowed by Python, and the stop must not be lost with it."""
    import signal

    from recops.demo.run import STOP_REQUESTED

    def interrupt(signum: int, frame: object) -> None:
        STOP_REQUESTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


@app.command()
def crds(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for recmodels.yaml and recexperiments.yaml.")],
) -> None:
    """Write the CustomResourceDefinitions, generated from the typed specs (``kubectl apply -f DIR``)."""
    from recops.api.crds import write_crds

    try:
        for path in write_crds(out):
            console.print(f"wrote {path}")
    except OSError as error:
        raise _fail(f"--out {out}: {error.strerror or error}") from None


@app.command("operator")
def run_operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Namespace to watch (repeatable; default: all).")
    ] = None,
    liveness_port: Annotated[int, typer.Option(min=0, max=65535, help="kopf's /healthz port (0: off).")] = 8080,
    metrics_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Prometheus /metrics port (0: off).")
    ] = 8081,
    standalone: Annotated[
        bool, typer.Option(help="No peering: for one replica without the KopfPeering CRDs (development, tests).")
    ] = False,
    priority: Annotated[
        int | None,
        typer.Option(help="Peering priority: the highest live replica works, others wait (default: random)."),
    ] = None,
) -> None:
    """Run the operator (kopf): RecModel → training Job → Triton; RecExperiment → router, steps and gates."""
    import random

    import kopf

    try:
        import recops.operator.handlers  # noqa: F401  (registers the handlers)
    except ValueError as error:  # a RECOPS_* setting that does not parse
        raise _fail(str(error)) from None
    if not standalone:
        from recops.operator.kube import Kube
        from recops.operator.peering import PeeringUnavailable, ensure_peering

        try:
            ensure_peering(Kube(), "recops", namespace or [])
        except PeeringUnavailable as error:
            raise _fail(str(error)) from None
    if metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port)
        except OSError as error:
            raise _fail(f"--metrics-port {metrics_port}: {error.strerror}") from None
    kopf.configure(verbose=False)
    kopf.run(
        clusterwide=not namespace,
        namespaces=namespace or (),
        standalone=standalone,
        # Distinct priorities make peering a leader election: equal ones would all pause.
        priority=priority if priority is not None else random.randint(1, 1_000_000),
        # With a peering name kopf waits for the KopfPeering CRD (the chart installs it); standalone needs none.
        peering_name=None if standalone else "recops",
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )


serve_app = typer.Typer(help="Run servers: Triton for a model repository, the A/B router.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


@serve_app.command("triton")
def serve_triton(
    repo: Annotated[Path, typer.Option("--repo", help="Triton model repository folder.")],
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="0: a free port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=0, max=65535, help="0: a free port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="0: a free port.")] = 8002,
    load_model: Annotated[
        list[str] | None,
        typer.Option(
            help="Explicit model control: load only this model at start (repeatable; recops_ensemble loads its "
            "steps too) and open the load/unload API that 'recops serve reloader' uses."
        ),
    ] = None,
) -> None:
    """Start a real Triton server (from the nvidia-pytriton wheel) on 127.0.0.1 until Ctrl-C."""
    import signal
    import threading

    from recops.serving.triton_server import TritonError, TritonPorts, TritonServer, free_port

    ports = TritonPorts(*(port or free_port() for port in (http_port, grpc_port, metrics_port)))
    server = TritonServer(repo, ports, explicit_models=tuple(load_model) if load_model else None)
    try:
        server.start()
    except TritonError as error:
        server.close()
        raise _fail(str(error)) from None
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    console.print(f"triton ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}")
    while not stopped.wait(0.5):
        if server.process is not None and server.process.poll() is not None:
            raise _fail(f"tritonserver exited with {server.process.returncode}:\n{server.log_tail()}")
    server.close()
    console.print("triton stopped")


@serve_app.command("reloader")
def serve_reloader(
    watch: Annotated[
        Path, typer.Option(help='JSON file {"revision": "...", "model": "/artifacts/..."} (a ConfigMap key).')
    ],
    model_repository: Annotated[Path, typer.Option(help="Triton's model repository (shared with Triton's container).")],
    triton_url: Annotated[str, typer.Option(help="Triton's HTTP endpoint, host:port or http://host:port.")] = (
        "127.0.0.1:8000"
    ),
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", help="RecModel whose serving settings to use (default: each model's own)."),
    ] = None,
    gpu: Annotated[
        bool | None, typer.Option("--gpu/--cpu", help="Ranker on KIND_GPU or KIND_CPU (default: the spec's GPUs).")
    ] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between reads of --watch.")] = 5.0,
) -> None:
    """Sidecar next to Triton (--model-control-mode=explicit): when --watch names another revision, export it
    into the repository and switch recops_ensemble to it without dropping requests. Runs until SIGTERM."""
    import logging
    import signal
    import threading

    from recops.serving.hot_reload import Reloader, TritonControl

    serving = _read_spec(spec_file).serving if spec_file is not None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    triton = TritonControl(triton_url)
    try:
        Reloader(watch, model_repository, triton, serving=serving, gpu=gpu).run(stopped, interval)
    finally:
        triton.close()


@serve_app.command("router")
def serve_router(
    config: Annotated[Path, typer.Option("--config", "-c", help="Router config (YAML): experiment, arms, limits.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each with its own feedback log file).")] = 1,
    feedback_path: Annotated[Path | None, typer.Option(
        help="The feedback log file, instead of the config's feedback.path (the operator gives each router pod "
             "its own, named after the pod); its folder is created.")] = None,
) -> None:
    """Run the A/B router (uvicorn) until SIGTERM/SIGINT; the config file is reloaded when it changes."""
    from recops.serving.router.config import ConfigError, load_config

    try:
        load_config(config)
    except ConfigError as error:
        raise _fail(str(error)) from None
    if feedback_path is not None:
        # Here, before uvicorn starts, so the error is one line rather than a failed ASGI start-up.
        try:
            feedback_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _fail(f"--feedback-path: cannot create {feedback_path.parent}: {error.strerror or error}") from None
        if feedback_path.is_dir() or not os.access(feedback_path.parent, os.W_OK):
            raise _fail(f"--feedback-path: {feedback_path} is a folder" if feedback_path.is_dir() else
                        f"--feedback-path: {feedback_path.parent} is not writable")
    from recops.serving.router.server import serve

    serve(config, host=host, port=port, workers=workers, feedback_path=feedback_path)


feedback_app = typer.Typer(help="The router's feedback events: pull them from Kafka for retraining.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("pull")
def feedback_pull(
    kafka: Annotated[str, typer.Option("--kafka", help="Bootstrap servers, host:port (comma-separated).")],
    topic: Annotated[str, typer.Option(help="The router's feedback topic (feedback.kafka.topic).")],
    group: Annotated[str, typer.Option(help="Consumer group whose committed offsets mark what was pulled.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to append the events to (created if absent).")],
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to reach the broker and to finish reading.")] = 30.0,
) -> None:
    """Append every event the group has not pulled yet (up to the topic's end now) to --out, fsync, then commit.

    A rerun appends only newer events; a crash before the commit re-reads them (retrain merges each once).
    """
    import logging

    from recops.training.feedback_pull import PullError, pull_feedback

    # aiokafka logs every retry it recovers from (coordinator not ready yet, ...); a real failure is raised
    # and printed below with the address or topic, so its own log is noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        result = pull_feedback(kafka, topic, group, out, timeout_s=timeout)
    except PullError as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"--out: cannot write {out}: {error.strerror or error}") from None
    print(result.events)  # stdout: the count alone, for scripts; the details go to stderr
    console.print(f"pulled {result.events} events from {topic} (group {group}) into {out}")


def _print_metrics(models: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    from recops.training.report import TABLE_METRICS

    columns = [c for c in TABLE_METRICS if any(c in m for m in models.values())]
    table = Table(title="test split", show_lines=False)
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for name, metrics in models.items():
        table.add_row(name, *(f"{metrics[c]:.4f}" if c in metrics else "–" for c in columns))
    Console(width=200).print(table)


def main() -> None:
    """Entry point for ``python -m recops``."""
    app()
