"""Reports: the Table II layout (terminal and Markdown), results.json, plots, final models."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.table import Table  # noqa: E402

from fedmi.core import params as P  # noqa: E402
from fedmi.experiments.table2 import Table2Result  # noqa: E402
from fedmi.core.metrics import format_summary  # noqa: E402

NOT_PRIVATE = "†"
FOOTNOTE = f"{NOT_PRIVATE} Mix pools the sites' data: not privacy-preserving, shown as a reference."


def _finite(obj):
    """JSON has no NaN or Infinity: they are written as the strings "NaN", "Infinity" and
    "-Infinity" (null stays reserved for a metric that is undefined)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return "NaN" if np.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj, indent: int | None = None) -> str:
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


class JsonlWriter:
    """Appends one JSON record per line (the per-round `metrics.jsonl`)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def __call__(self, record: dict) -> None:
        self._file.write(to_json(record) + "\n")
        self._file.flush()  # each round is on disk when it ends: a crash loses no finished round

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _title(result: Table2Result) -> str:
    title = f"Table II protocol: {result.dataset}"
    if result.synthetic:
        title += " (SYNTHETIC DATA)"
    return title


def _table_rows(result: Table2Result) -> Iterable[tuple[str, str, list[str]]]:
    for site in result.sites:
        for row in result.rows:
            per_site = result.results[row["label"]].get(site)
            label = row["label"] + ("" if row["privacy_preserving"] else f" {NOT_PRIVATE}")
            if per_site is None:  # Cross: the site it was trained on
                yield site, label, ["–"] * len(result.task.table_metrics)
            else:
                yield site, label, [format_summary(per_site[m]) for m in result.task.table_metrics]


def _caption(result: Table2Result) -> str:
    cfg = result.config
    ratio = f"stratified {1 - cfg.test_fraction:.0%}/{cfg.test_fraction:.0%} split"
    if result.fixed_split:
        split = "one fixed train/test split" + (f", mean±std over {cfg.repeats} training seeds" if cfg.repeats > 1 else "")
    elif cfg.repeats == 1:
        split = f"one {ratio}"
    else:
        split = f"mean±std over {cfg.repeats} repeats of a {ratio}"
    return (f"{split}; model {cfg.model}; {cfg.rounds} rounds. "
            "n/a: undefined (a test split with one class); (k/n): defined in k of n repeats.")


def rich_table(result: Table2Result) -> Table:
    table = Table(title=_title(result), caption=_caption(result) + "\n" + FOOTNOTE, show_lines=False)
    for col in ("Site", "Method", *(m.upper() for m in result.task.table_metrics)):
        table.add_column(col, justify="left" if col in ("Site", "Method") else "right")
    previous = None
    for site, label, cells in _table_rows(result):
        if previous is not None and site != previous:
            table.add_section()
        table.add_row(site if site != previous else "", label, *cells)
        previous = site
    return table


def markdown_table(result: Table2Result) -> str:
    lines = [f"# {_title(result)}", "", result.description, "",
             "| Site | Method | " + " | ".join(m.upper() for m in result.task.table_metrics) + " |",
             "|---|---|" + "---:|" * len(result.task.table_metrics)]
    previous = None
    for site, label, cells in _table_rows(result):
        lines.append(f"| {site if site != previous else ''} | {label} | " + " | ".join(cells) + " |")
        previous = site
    lines += ["", _caption(result), "", FOOTNOTE, ""]
    return "\n".join(lines)


def plot_by_site(result: Table2Result, path: Path) -> None:
    """The task's primary metric (AUC for binary tasks) per site and setting, mean with std error bars."""
    metric, name = result.task.primary, result.task.primary.upper()
    labels = [r["label"] for r in result.rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(result.sites) + 0.25 * len(labels)) + 1.8, 4.2))
    width = 0.8 / len(labels)
    colors = plt.get_cmap("tab10")
    for j, row in enumerate(result.rows):
        means, errs, xs = [], [], []
        for i, site in enumerate(result.sites):
            s = result.results[row["label"]].get(site, {}).get(metric)
            if s and s["mean"] is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(s["mean"])
                errs.append(s["std"] or 0.0)
        label = row["label"] + ("" if row["privacy_preserving"] else f" {NOT_PRIVATE} (pooled data)")
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label, color=colors(j % 10),
               hatch="//" if row["method"] == "cross" else None, alpha=0.9)
    for i, site in enumerate(result.sites):
        if not any((result.results[r["label"]].get(site, {}).get(metric) or {}).get("mean") is not None
                   for r in result.rows):
            ax.text(i, 0.5, f"{name} n/a\n(undefined\non test)", ha="center", va="center", fontsize=8, color="grey")
    ax.set_xticks(range(len(result.sites)), result.sites)
    ax.set_ylabel(f"test {name} (mean ± std)")
    if metric == "auc":
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(_title(result) + f": {name} per site")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over, the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def convergence_curves(history: list[dict], metric: str = "auc") -> dict[str, dict[str, np.ndarray]]:
    """Per method: rounds, mean and std over repeats of the train loss and of the site-mean test `metric`."""
    by_method: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for rec in history:
        m = by_method[rec["method"]]
        if rec.get("train_loss") is not None:
            m["train_loss"][rec["round"]].append(rec["train_loss"])
        values = [v[metric] for v in rec.get("test", {}).values() if v.get(metric) is not None]
        if values:
            m["test"][rec["round"]].append(float(np.mean(values)))
    out: dict[str, dict[str, np.ndarray]] = {}
    for method, series in by_method.items():
        out[method] = {}
        for key, per_round in series.items():
            rounds = sorted(per_round)
            out[method][key] = np.array([[r, np.mean(per_round[r]), np.std(per_round[r])] for r in rounds])
    return out


def plot_convergence(history: list[dict], path: Path, title: str, metric: str = "auc") -> None:
    curves = convergence_curves(history, metric)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, series in curves.items():
        for ax, key in zip(axes, ("train_loss", "test")):
            if key in series:
                r, mu, sd = series[key].T
                ax.plot(r, mu, label=method)
                ax.fill_between(r, mu - sd, mu + sd, alpha=0.2)
    axes[0].set(xlabel="round", ylabel="training loss (sample-weighted)", title="training loss")
    axes[1].set(xlabel="round", ylabel=f"test {metric.upper()}, mean over sites", title=f"test {metric.upper()}")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table2_report(result: Table2Result, out: Path) -> list[Path]:
    """Write results.json, table.md, the plots and the final models; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "table.md", out / f"{result.task.primary}_by_site.png"]
    written[0].write_text(to_json(result.to_json(), indent=2) + "\n")
    written[1].write_text(markdown_table(result))
    plot_by_site(result, written[2])
    if result.history:
        written.append(out / "convergence.png")
        plot_convergence(result.history, written[-1], _title(result) + ": federated methods", result.task.primary)
    for name, params in result.models.items():
        written.append(out / "models" / f"{name}.safetensors")
        P.save(params, written[-1], metadata={"dataset": result.dataset, "model": result.config.model})
    return written
