"""Reports: the Table II layout (terminal and Markdown), results.json, plots, final models."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.table import Table  # noqa: E402

from fedmi.core import params as P  # noqa: E402
from fedmi.experiments.outputs import to_json  # noqa: E402
from fedmi.errors import counted  # noqa: E402
from fedmi.experiments.federated_run import privacy_level, privacy_spent  # noqa: E402
from fedmi.experiments.table2 import LABELS, Table2Result  # noqa: E402
from fedmi.core.metrics import format_summary, summarize  # noqa: E402
from fedmi.data.federation import COMMON_TEST  # noqa: E402

NOT_PRIVATE = "†"
FOOTNOTE = f"{NOT_PRIVATE} Mix pools the sites' data: not privacy-preserving, shown as a reference."


def _title(result: Table2Result) -> str:
    title = f"Table II protocol: {result.dataset}"
    if result.synthetic:
        title += " (SYNTHETIC DATA)"
    return title


def _table_rows(result: Table2Result) -> Iterable[tuple[str, str, list[str]]]:
    """(site cell, row label, metric cells): a site's name on its first row, its test n on the second."""
    for site in result.sites:
        for i, row in enumerate(result.rows):
            per_site = result.results[row["label"]].get(site)
            label = row["label"] + ("" if row["privacy_preserving"] else f" {NOT_PRIVATE}")
            cell = "" if i else (f"{site} (test n={result.test_n[site]})" if site in result.test_n else site)
            if per_site is None:  # Cross: the site it was trained on
                yield cell, label, ["–"] * len(result.task.table_metrics)
            else:
                yield cell, label, [format_summary(per_site[m]) for m in result.task.table_metrics]


SITE_MEAN = "Mean over sites"


def site_means(result: Table2Result) -> dict[str, dict[str, dict]]:
    """Per row and metric, the mean over the sites' own test splits in each repeat, summarised over
    repeats (FLamby's benchmark metric: the average of the per-site test metrics). A repeat in which
    a site's metric is undefined has no mean. Cross rows (no own site) and the common test set are left out."""
    own = [s for s in result.sites if s != COMMON_TEST]
    out: dict[str, dict[str, dict]] = {}
    for row in result.rows:
        by_site = result.results[row["label"]]
        if row["method"] == "cross" or any(s not in by_site for s in own):
            continue
        out[row["label"]] = {}
        for m in result.task.table_metrics:
            per_repeat = zip(*(by_site[s][m]["values"] for s in own))
            out[row["label"]][m] = summarize(
                [None if any(v is None for v in vals) else sum(vals) / len(vals) for vals in per_repeat])
    return out


def _site_mean_rows(result: Table2Result) -> Iterable[tuple[str, str, list[str]]]:
    if len([s for s in result.sites if s != COMMON_TEST]) < 2:
        return
    for i, (label, metrics) in enumerate(site_means(result).items()):
        private = next(r for r in result.rows if r["label"] == label)["privacy_preserving"]
        yield ("" if i else SITE_MEAN), label + ("" if private else f" {NOT_PRIVATE}"), \
            [format_summary(metrics[m]) for m in result.task.table_metrics]


def class_note(task_name: str, label_names: Sequence[str]) -> str:
    """What the classes are: for a binary task what SEN and SPE refer to, for a k-class task each
    class's index and name (its metrics are sen_k, spe_k, auc_k); "" otherwise."""
    if task_name == "multiclass":
        return (f"{len(label_names)} classes: " + ", ".join(f"{k} = {n}" for k, n in enumerate(label_names))
                + " (per class k: sen_k, spe_k, auc_k in results.json)")
    if task_name != "binary" or len(label_names) != 2:
        return ""
    return (f"positive class: {label_names[1]} (SEN: share of {label_names[1]} cases found; "
            f"SPE: share of {label_names[0]} cases)")


def _caption(result: Table2Result) -> str:
    cfg = result.config
    ratio = f"stratified {1 - cfg.test_fraction:.0%}/{cfg.test_fraction:.0%} split" + \
        (" by patient" if result.by_patient else "")
    if result.fixed_split:
        split = "one fixed train/test split" + (f", mean±std over {cfg.repeats} training seeds" if cfg.repeats > 1 else "")
    elif cfg.repeats == 1:
        split = f"one {ratio}"
    else:
        split = f"mean±std over {cfg.repeats} repeats of a {ratio}"
    chosen = (f"; each model from the round (centralised: the pass) with the best validation "
              f"{result.task.primary.upper()}, on {cfg.val_fraction:.0%} of each site's training data held out"
              if cfg.val_fraction else "")
    return (f"{split}; model {cfg.model}; {counted(cfg.rounds, 'round')}{chosen}. "
            "n/a: undefined there (the notes give why); (k/n): defined in k of n repeats.")


def table_notes(result: Table2Result) -> list[str]:
    """What a reader must know beside the numbers: the positive class, the privacy each setting spent,
    and each setting and site whose model predicted one class for every test case."""
    positive = class_note(result.task.name, result.label_names)
    return ([positive] if positive else []) + privacy_notes(result) + undefined_notes(result) + \
        uniform_warnings(result.uniform_predictions(), result.label_names, result.task.name)


def privacy_notes(result: Table2Result) -> list[str]:
    """One line per federated setting of a private protocol: the ε at δ its final model spent (the
    largest over the sites where they account it), mean±std over the repeats."""
    plan = result.config.private_plan()
    if plan.privacy is None:
        return []
    last: dict[tuple[str, int], dict] = {}
    for record in result.history:  # each unit's rounds in order: its last record is its final model's
        last[(record["method"], record["repeat"])] = record
    spent: dict[str, list[float]] = {}
    for (method, _), record in last.items():
        if (budget := privacy_spent(record, plan.privacy)) is not None:
            spent.setdefault(method, []).append(budget["epsilon"])
    lines = [f"Differential privacy ({privacy_level(plan.privacy)}, clipping norm {plan.privacy.clip_norm:g}) in "
             "every federated setting; the centralised settings are without it."]
    for method, values in spent.items():
        same = max(values) - min(values) <= 1e-6 * abs(max(values))  # a calibrated target: every repeat's
        eps = f"{values[0]:.3g}" if same else format_summary(summarize(values), 3)
        lines.append(f"{LABELS.get(method, method)}: ε {eps} at δ {plan.privacy.delta:g}.")
    return lines


def undefined_notes(result: Table2Result) -> list[str]:
    """One line per site where a table metric is n/a in some repeat because its test split lacked a
    class: which class, in how many repeats, which metrics (and so the mean over sites)."""
    lines = []
    names = result.label_names
    for site, per_repeat in result.test_classes.items():
        missing: dict[tuple[str, ...], int] = {}  # the classes absent -> repeats
        undefined: set[str] = set()
        for counts in per_repeat:
            absent = tuple(f"'{names[k] if k < len(names) else k}'" for k, n in enumerate(counts) if n == 0)
            if not absent:
                continue
            present = sum(1 for n in counts if n)
            if result.task.name == "binary":
                lost = {"sen" if counts[1] == 0 else "spe", "auc"}
            else:
                lost = {"auc"} if present < 2 else set()
            lost &= set(result.task.table_metrics)
            if lost:
                missing[absent] = missing.get(absent, 0) + 1
                undefined |= lost
        if not undefined:
            continue
        which = "; ".join(f"no {' or '.join(absent)} case in {counted(k, 'repeat')}" for absent, k in missing.items())
        lines.append(f"n/a at {site}: its test split held {which} of {len(per_repeat)}, so "
                     f"{'/'.join(m.upper() for m in sorted(undefined))} are undefined there"
                     + (" (and in the mean over sites)" if len(result.test_classes) > 1 else ""))
    return lines


def uniform_warnings(found: Iterable[tuple[str, str, int, int, list[int]]], label_names: Sequence[str],
                     task_name: str = "binary") -> list[str]:
    """One line per (setting, site) whose model predicted a single class for every test case."""
    lines = []
    for label, site, k, n, classes in found:
        names = [label_names[c] if c < len(label_names) else str(c) for c in classes]
        which = names[0] if len(names) == 1 else " in some, ".join(names) + " in others"
        # Single on a common test set scores every site's own model: count models, not repeats.
        unit = "models" if label == "Single" and site == COMMON_TEST else "repeats"
        lines.append(f"WARNING: {label} at {site} predicted one class ({which}) for every test case in {k} of {n} "
                     f"{unit}: its {'SEN/SPE' if task_name == 'binary' else 'ACC/BACC'} there reflect that, not skill")
    return lines


def rich_table(result: Table2Result) -> Table:
    """The table for a terminal; print `table_notes(result)` after it."""
    table = Table(title=_title(result), caption=_caption(result) + "\n" + FOOTNOTE, show_lines=False)
    for col in ("Site", "Method", *(m.upper() for m in result.task.table_metrics)):
        table.add_column(col, justify="left" if col in ("Site", "Method") else "right")
    for i, (cell, label, cells) in enumerate([*_table_rows(result), *_site_mean_rows(result)]):
        if i and cell:
            table.add_section()
        table.add_row(cell, label, *cells)
    return table


def markdown_table(result: Table2Result) -> str:
    lines = [f"# {_title(result)}", "", result.description, "",
             "| Site | Method | " + " | ".join(m.upper() for m in result.task.table_metrics) + " |",
             "|---|---|" + "---:|" * len(result.task.table_metrics)]
    for cell, label, cells in [*_table_rows(result), *_site_mean_rows(result)]:
        lines.append(f"| {cell} | {label} | " + " | ".join(cells) + " |")
    notes = table_notes(result)
    lines += ["", _caption(result), "", FOOTNOTE, "", *(f"- {n}" for n in notes), *([""] if notes else [])]
    return "\n".join(lines)


# Okabe & Ito's palette: told apart with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _metric_limits(values: list[tuple[float, float]], metric: str) -> tuple[float, float]:
    """A y-range that shows the differences: from 0 only where some value is near it."""
    if not values:
        return 0.0, 1.05
    low = min(m - e for m, e in values)
    high = max(m + e for m, e in values)
    if metric in ("auc", "acc", "bacc", "sen", "spe", "dice", "iou"):
        floor = 0.0 if low < 0.3 else np.floor((low - 0.05) * 10) / 10
        return floor, min(1.02, max(high + 0.02, floor + 0.1))
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def plot_by_site(result: Table2Result, path: Path) -> None:
    """The task's primary metric (AUC for binary tasks) per site and setting, mean with std error bars."""
    metric, name = result.task.primary, result.task.primary.upper()
    labels = [r["label"] for r in result.rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(result.sites) + 0.25 * len(labels)) + 1.8, 4.4))
    width = 0.8 / len(labels)
    shown: list[tuple[float, float]] = []
    absent: list[float] = []  # x of each Cross bar left out: its model was trained on that site
    for j, row in enumerate(result.rows):
        means, errs, xs = [], [], []
        for i, site in enumerate(result.sites):
            x = i - 0.4 + width * (j + 0.5)
            if row["method"] == "cross" and row["trained_on"] == site:
                absent.append(x)
                continue
            s = result.results[row["label"]].get(site, {}).get(metric)
            if s and s["mean"] is not None:
                xs.append(x)
                means.append(s["mean"])
                errs.append(s["std"] or 0.0)
        shown += list(zip(means, errs))
        label = row["label"] + ("" if row["privacy_preserving"] else f" {NOT_PRIVATE} (pooled data)")
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label, color=PALETTE[j % len(PALETTE)],
               hatch="//" if row["method"] == "cross" else ("xx" if j >= len(PALETTE) else None),
               edgecolor="white", linewidth=0.3)
    low, high = _metric_limits(shown, metric)
    ax.set_ylim(low, high)
    for x in absent:
        ax.text(x, low + 0.02 * (high - low), "own site", rotation=90, ha="center", va="bottom", fontsize=6,
                color="grey")
    for i, site in enumerate(result.sites):
        if not any((result.results[r["label"]].get(site, {}).get(metric) or {}).get("mean") is not None
                   for r in result.rows):
            ax.text(i, (low + high) / 2, f"{name} n/a\n(undefined\non test)", ha="center", va="center", fontsize=8,
                    color="grey")
    ticks = [f"{s}\n(test n={result.test_n[s]})" if s in result.test_n else s for s in result.sites]
    ax.set_xticks(range(len(result.sites)), ticks)
    ax.set_xlim(-0.5, len(result.sites) - 0.5)  # a site without any bar keeps its place
    ax.set_ylabel(f"test {name} (mean ± std)")
    if metric == "auc" and low < 0.5 < high:
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    positive = class_note(result.task.name, result.label_names)
    ax.set_title(_title(result) + f": {name} per site" + (f"\n{positive}" if positive else ""), fontsize=10)
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
    """Training loss and the site-mean test `metric` by round, one line (mean ± std band over
    repeats) per method; each method has its own colour, marker and dash, so overlapping bands
    stay apart."""
    from matplotlib.ticker import MaxNLocator

    curves = convergence_curves(history, metric)
    sites = sorted({site for rec in history for site in rec.get("test", {})})
    defined = [s for s in sites if any((rec.get("test", {}).get(s) or {}).get(metric) is not None for rec in history)]
    undefined = [s for s in sites if s not in defined]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for j, (method, series) in enumerate(curves.items()):
        style = {"color": PALETTE[j % len(PALETTE)], "marker": MARKERS[j % len(MARKERS)],
                 "ls": ("-", "--", "-.", ":")[j % 4], "label": LABELS.get(method, method)}
        for ax, key in zip(axes, ("train_loss", "test")):
            if key in series:
                r, mu, sd = series[key].T
                ax.plot(r, mu, markevery=max(1, len(r) // 8), markersize=5, lw=1.4, **style)
                ax.fill_between(r, mu - sd, mu + sd, alpha=0.15, color=style["color"])
    over = ", ".join(defined) if len(defined) <= 5 else f"{len(defined)} sites"
    left_out = (f"\n({', '.join(undefined) if len(undefined) <= 3 else f'{len(undefined)} sites'}: undefined on "
                "the test split, left out)") if undefined else ""
    axes[0].set(xlabel="round", ylabel="training loss (sample-weighted)", title="training loss")
    axes[1].set(xlabel="round", ylabel=f"test {metric.upper()}, mean over sites",
                title=f"test {metric.upper()}: mean over {over}{left_out}")
    axes[1].title.set_fontsize(9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table2_report(result: Table2Result, out: Path, models: bool = True) -> list[Path]:
    """Write results.json, table.md, the plots and (unless `models` is False: a `ProtocolFolder`
    kept each as its setting finished) the final models; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "table.md", out / f"{result.task.primary}_by_site.png"]
    written[0].write_text(to_json({**result.to_json(), "site_means": site_means(result)}, indent=2) + "\n")
    written[1].write_text(markdown_table(result))
    plot_by_site(result, written[2])
    if result.history:
        written.append(out / "convergence.png")
        plot_convergence(result.history, written[-1], _title(result) + ": federated methods", result.task.primary)
    for name, params in (result.models.items() if models else ()):
        written.append(out / "models" / f"{name}.safetensors")
        P.save(params, written[-1], metadata={"dataset": result.dataset, "model": result.config.model})
    return written
