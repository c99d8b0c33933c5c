"""The training report: one self-contained HTML file with plots and tables."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

TABLE_METRICS = (
    "recall@10", "recall@20", "recall@50", "recall@100", "ndcg@10", "mrr@10",
    "cold_recall@20", "click_auc", "like_auc", "like_auc_clicked", "train_seconds",
)


Figure = float | Mapping[str, object]  # one seed's number, or {"mean", "std", "values"} over seeds


def summarise_seeds(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Figure]]:
    """Per model and metric, the mean, spread (sample std; 0 for one run) and values over runs (one per seed).

    ``runs``: each seed's ``{model: {metric: number}}``. A single run is returned as it is (plain
    numbers); a metric that a run lacks is left out of that model, so every summary is over all runs.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    if len(runs) == 1:
        return {name: dict(metrics) for name, metrics in runs[0].items()}
    summary: dict[str, dict[str, Figure]] = {}
    for name in runs[0]:
        if not all(name in run for run in runs):
            raise ValueError(f"model {name!r} is missing from some runs")
        metrics = [key for key, value in runs[0][name].items() if isinstance(value, int | float)]
        summary[name] = {}
        for key in metrics:
            values = [float(run[name][key]) for run in runs if isinstance(run[name].get(key), int | float)]
            if len(values) == len(runs):
                summary[name][key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
                                      "values": values}
    return summary


def mean_of(figure: object) -> float | None:
    """The number a table shows for a figure: itself, or its mean over seeds (None: not a figure)."""
    if isinstance(figure, Mapping) and isinstance(figure.get("mean"), int | float):
        return float(figure["mean"])
    if isinstance(figure, int | float) and not isinstance(figure, bool):
        return float(figure)
    return None


def _cell(figure: object, digits: int = 4) -> str:
    mean = mean_of(figure)
    if mean is None:
        return "–"
    if isinstance(figure, Mapping):
        return f"{mean:.{digits}f} ± {float(figure['std']):.{digits}f}"
    return f"{mean:.{digits}f}"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def loss_figure(losses: Sequence[Mapping[str, float]]):
    """Training loss terms against step (moving average); the softmax and the BCE terms on their own scales."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    window = max(1, len(losses) // 50)
    for axis, keys, title in ((axes[0], ("loss", "retrieval"), "total and retrieval"),
                              (axes[1], ("click", "like"), "click and like heads (BCE)")):
        for key in keys:
            smoothed = _smooth(np.array([row[key] for row in losses], dtype=float), window)
            axis.plot(np.arange(len(smoothed)) + window - 1, smoothed, label=key)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.legend()
    axes[0].set_ylabel("loss")
    return figure


def validation_figure(valid: Sequence[Mapping[str, float]], metric: str = "ndcg@10"):
    """Validation ``metric`` after each epoch (what training keeps its best epoch by)."""
    figure, axis = plt.subplots(figsize=(7, 3))
    rows = [row for row in valid if metric in row]
    axis.plot([row["epoch"] + 1 for row in rows], [row[metric] for row in rows], marker="o")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"valid {metric}")
    axis.set_title("Validation")
    return figure


def learning_curves_figure(curves: Mapping[str, Sequence[Sequence[Sequence[float]]]], metric: str = "ndcg@10"):
    """Validation ``metric`` by epoch per model: ``curves[model]`` holds one ``[[epoch, value], ...]`` per seed."""
    figure, axis = plt.subplots(figsize=(8, 3.8))
    for index, (name, runs) in enumerate(curves.items()):
        for run_index, run in enumerate(runs):
            if run:
                epochs, values = zip(*run, strict=True)
                axis.plot(epochs, values, color=f"C{index}", alpha=0.9 if run_index == 0 else 0.45,
                          label=name if run_index == 0 else None)
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"valid {metric}")
    axis.set_title(f"Learning curves (validation {metric}; one line per seed)")
    axis.legend(loc="lower right")
    return figure


def save_learning_curves(curves: Mapping[str, Sequence[Sequence[Sequence[float]]]], path: Path) -> Path:
    """:func:`learning_curves_figure` as a PNG file."""
    figure = learning_curves_figure(curves)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def recall_figure(models: Mapping[str, Mapping[str, object]], wanted: Sequence[str] | None = None):
    """Warm Recall@K and cold Recall@20 per model, side by side (error bars: the spread over seeds)."""
    names = list(models)
    wanted = wanted or ("recall@10", "recall@20", "recall@50", "cold_recall@20")
    keys = [k for k in wanted if any(k in m for m in models.values())]
    figure, axis = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(keys))
    positions = np.arange(len(names))
    for i, key in enumerate(keys):
        figures = [models[n].get(key) for n in names]
        heights = [np.nan if mean_of(f) is None else mean_of(f) for f in figures]
        spreads = [float(f["std"]) if isinstance(f, Mapping) else 0.0 for f in figures]
        axis.bar(positions + i * width, heights, width, label=key,
                 yerr=spreads if any(spreads) else None, capsize=2)
    axis.set_xticks(positions + width * (len(keys) - 1) / 2, names, rotation=20, ha="right")
    ranked = any(key.startswith("ndcg") for key in keys)
    axis.set_ylabel("recall / NDCG" if ranked else "recall")
    axis.set_title(("Recall and NDCG" if ranked else "Recall")
                   + (", warm and cold items" if any(k.startswith("cold") for k in keys) else ""))
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def save_recall_plot(models: Mapping[str, Mapping[str, object]], path: Path,
                     wanted: Sequence[str] | None = None) -> Path:
    """The recall bar chart as a PNG file (for READMEs and notes); ``wanted``: the metrics to draw."""
    figure = recall_figure(models, wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def metrics_table(models: Mapping[str, Mapping[str, float]]) -> str:
    """An HTML table of the headline metrics, one row per model."""
    columns = [c for c in TABLE_METRICS if any(c in m for m in models.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for name, metrics in models.items():
        cells = "".join(
            f"<td>{metrics[c]:.4f}</td>" if isinstance(metrics.get(c), float | int) else "<td>–</td>" for c in columns
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def markdown_table(models: Mapping[str, Mapping[str, object]], columns: Sequence[str]) -> str:
    """The same table as Markdown (for the README and notes): a figure over seeds reads ``mean ± std``."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in models.items():
        cells = [_cell(metrics.get(c), 1 if c == "train_seconds" else 4) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    path: Path,
    title: str,
    models: Mapping[str, Mapping[str, float]],
    losses: Sequence[Mapping[str, float]],
    valid: Sequence[Mapping[str, float]],
    data_summary: Mapping[str, object],
    drops: Mapping[str, int],
) -> Path:
    """Write ``report.html`` (plots embedded as PNG) and return its path."""
    figures = []
    if losses:
        figures.append(("Training loss", loss_figure(losses)))
    if any("recall@20" in row for row in valid):
        figures.append(("Validation", validation_figure(valid)))
    figures.append(("Recall", recall_figure(models)))
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{_png(fig)}">'
        for name, fig in figures
    )
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in data_summary.items()
    )
    drop_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in drops.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Metrics (test split)</h2>{metrics_table(models)}
{images}
<h2>Data</h2><table>{facts}</table>
<h2>Rows dropped by cleaning</h2><table>{drop_rows}</table>
</body></html>"""
    path.write_text(page)
    return path
