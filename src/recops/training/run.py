"""One training run end to end: data → model → evaluation beside baselines → export → report.

This is what ``recops train`` and the trainer image run; the quality benchmark
uses the same pieces so its figures describe what users get.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from recops.api.recmodel import RecModelSpec
from recops.data.interactions import InteractionData
from recops.data.io import DataFormatError, resolve_uri
from recops.data.prepare import prepare
from recops.models.backbone import BackboneError
from recops.models.baselines import BASELINES, make_baseline
from recops.models.two_tower import TwoTowerModel
from recops.training.distillation import TeacherError
from recops.training.distributed import start, stop, world_from_env
from recops.training.evaluation import DEFAULT_KS, evaluate
from recops.training.export import export_model
from recops.training.report import write_report
from recops.training.trainer import CheckpointMismatch, ModelScorer, TrainResult, train, training_device
from recops.training.warm_start import WarmStartMismatch


class TrainingFailed(RuntimeError):
    """A run that cannot go on; the message says why (bad data, backbone, checkpoint)."""


def validation_metric(data: InteractionData, metric: str = "ndcg@10"):
    """A scorer's ``metric`` on ``data.valid`` (what models trained by epochs stop early on); None when there
    is no validation split."""
    if data.valid.height == 0:
        return None
    k = int(metric.split("@")[1])
    return lambda scorer: evaluate(scorer, data, ks=(k,), split="valid", with_auc=False)[metric]


def evaluate_baselines(data: InteractionData, names: Sequence[str], seed: int = 0,
                       ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, object]]:
    """Fit and evaluate each named baseline on ``data`` at the cut-offs ``ks``; adds ``train_seconds``.

    ``seed`` also seeds the baselines that draw (BPR, SASRec), so a spread over seeds includes theirs.
    Baselines trained by epochs stop early on validation NDCG@10 and add ``epochs`` (run), ``best_epoch``
    (kept) and ``curve`` (``[epoch, validation NDCG@10]`` pairs).
    """
    results: dict[str, dict[str, object]] = {}
    validate = validation_metric(data)
    for name in names:
        started = time.perf_counter()
        seeded = "seed" in inspect.signature(BASELINES[name]).parameters
        model = make_baseline(name, **({"seed": seed} if seeded else {}))
        model.fit(data, validate=validate)
        seconds = time.perf_counter() - started
        results[name] = {**evaluate(model, data, ks=ks, seed=seed), "train_seconds": seconds}
        if hasattr(model, "curve"):
            results[name].update(epochs=model.epochs_run, best_epoch=model.best_epoch,
                                 curve=[list(point) for point in model.curve])
    return results


def progress_bar(description: str, disable: bool = False) -> Progress:
    """The progress bar long steps show (rich; quiet when output is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        disable=disable,
    )


def train_with_progress(
    spec: RecModelSpec,
    data: InteractionData,
    out: Path,
    restart: bool = False,
    warm_start: Path | None = None,
    show: bool = True,
) -> TrainResult:
    """Train with a progress bar showing the step, the loss and the time left (``show=False``: without)."""
    with progress_bar("train", disable=not show) as progress:
        task = progress.add_task("train two-tower", total=None, status="")

        def on_step(done: int, total: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=done, total=total, status=f"loss {losses['loss']:.3f}")

        try:
            return train(spec, data, out, on_step=on_step, restart=restart, warm_start=warm_start)
        except (CheckpointMismatch, BackboneError, WarmStartMismatch, TeacherError) as error:
            raise TrainingFailed(str(error)) from error


def run_training(
    spec: RecModelSpec,
    out: Path,
    restart: bool = False,
    baselines: Sequence[str] = ("pop", "itemcf", "ease", "tfidf"),
    data: InteractionData | None = None,
    warm_start: Path | None = None,
) -> dict:
    """Train, evaluate, export and report; returns the summary also written to ``metrics.json``.

    ``warm_start``: the last revision's model directory, to continue from (``recops retrain``).
    """
    started = time.perf_counter()
    if data is None:
        try:
            data = prepare(spec.data, seed=spec.training.seed)
        except (DataFormatError, ValueError) as error:
            raise TrainingFailed(str(error)) from error
    world = world_from_env()
    start(world, training_device(spec, world))
    try:
        result = train_with_progress(spec, data, out, restart=restart, warm_start=warm_start, show=world.is_main)
    finally:
        stop(world)
    if not world.is_main:  # rank 0 evaluates, exports and reports
        return {"rank": world.rank, "seconds": time.perf_counter() - started}
    model_metrics = {
        **evaluate(ModelScorer(result.model, result.histories), data, seed=spec.training.seed),
        "train_seconds": result.seconds,
    }
    models = {"twotower": model_metrics, **evaluate_baselines(data, baselines, seed=spec.training.seed)}
    summary = {
        "data": data.summary(),
        "drops": data.drops,
        "metrics": models,
        "best_epoch": result.state.best_epoch,
        "processes": world.size,  # torchrun's WORLD_SIZE: each process trained on its shard of every batch
        "warm_start": asdict(result.warm_start) if result.warm_start else None,
        "teacher": _teacher_summary(spec),
        "valid": result.state.valid,
        "seconds": time.perf_counter() - started,
    }
    export_model(result.model, spec, data, out, metrics=summary)
    summary["serving"] = serving_summary(result.model, out)
    write_report(
        out / "report.html",
        "recops training report",
        models,
        result.state.losses,
        result.state.valid,
        data.summary(),
        data.drops,
    )
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _teacher_summary(spec: RecModelSpec) -> dict | None:
    """The teacher's own evaluation beside the student's (what it reported when it was trained)."""
    if spec.distillation is None:
        return None
    metrics_file = Path(resolve_uri(spec.distillation.teacher)) / "metrics.json"
    reported = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "artifact": spec.distillation.teacher,
        "metrics": reported.get("metrics", {}).get("twotower"),
        "temperature": spec.distillation.temperature,
        "weight": spec.distillation.weight,
        "retrieval_weight": spec.distillation.retrieval_share(),
        # The teacher's own serving cost, from its export (None for a teacher exported before it was reported).
        "serving": reported.get("serving"),
    }


def serving_summary(model: TwoTowerModel, directory: Path) -> dict[str, int | None]:
    """What serving the exported model in ``directory`` costs, read off its shapes (no timing).

    Per request, serving reads the item index and runs the towers' MLPs and heads (never the backbone);
    the backbone's depth is what encoding a new item's text costs.
    """
    index = np.load(directory / "item_index.npy", mmap_mode="r")  # only the header is read
    config = getattr(getattr(model.encoder, "model", None), "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    towers = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder."))
    return {
        "embedding_dim": int(index.shape[1]),
        "items": int(index.shape[0]),
        "index_bytes": int(index.nbytes),
        "tower_parameters": int(towers),
        "backbone_layers": int(layers) if layers else None,
    }
