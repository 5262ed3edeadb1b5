"""The corrupted-site protocol (survey §V-C): how much AUC each aggregator keeps when a fraction of
the sites is corrupted, for each kind of corruption.

For every repeat, kind of corruption, fraction of corrupted sites and aggregation pipeline, one
federated run trains from the same initial model; its final global model is scored on every
site's own test split (test data are never corrupted) and the table reports the mean over sites of
the primary metric (AUC; over the sites where it is defined: a small site's test split may hold
one class), mean ± std over repeats. The corrupted sites of a repeat are the first
round(fraction x sites) (at least one) of a random order drawn once per repeat, so the 10% set lies
within the 30% set. Kinds:

  label_flip, noisy_data, blurred_images   the corrupted sites' training data (`fedmi.data.corruption`)
  sign_flip, scaled, gaussian, nan, inf    the corrupted sites' updates (`fedmi.client.corrupted`)

Fraction 0 is the clean federation, run once per aggregator and shared by every kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedmi.client import make_method
from fedmi.client.corrupted import UPDATE_CORRUPTIONS, CorruptedUpdates
from fedmi.core import params as P
from fedmi.core.metrics import format_summary, summarize
from fedmi.core.rng import Stream, numpy_generator, repeat_seed, torch_generator
from fedmi.core.runner import Runner
from fedmi.core.types import SiteData
from fedmi.data.corruption import DATA_CORRUPTIONS
from fedmi.data.federation import Federation
from fedmi.errors import FedmiError, check_number
from fedmi.experiments.outputs import ROBUSTNESS, write_protocol_files
from fedmi.models import build_model
from fedmi.runtime import make_runtime
from fedmi.server import make_aggregator

KINDS = (*DATA_CORRUPTIONS, *UPDATE_CORRUPTIONS)
DEFAULT_AGGREGATORS = ("weighted_mean", "median", "trimmed_mean(beta=0.3)", "krum(f=3)", "multi_krum(f=3)",
                       "geometric_median", "norm_bound(factor=1.0) | weighted_mean", "dos")
DEFAULT_KINDS = ("label_flip", "noisy_data", "sign_flip", "gaussian", "scaled", "nan")
# The size of each kind unless `strength` says otherwise: a flip rate, noise sd, blur sigma, or an update scale.
DEFAULT_STRENGTH = {"label_flip": 0.5, "noisy_data": 2.0, "blurred_images": 2.0}


@dataclass
class RobustnessConfig:
    aggregators: list[str] = field(default_factory=lambda: list(DEFAULT_AGGREGATORS))
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    strength: dict[str, float] = field(default_factory=dict)  # per kind, overriding its default size
    repeats: int = 3
    rounds: int = 20
    seed: int = 0
    test_fraction: float = 0.2
    model: str = "logistic"
    model_options: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=lambda: {"name": "fedavg", "lr": 0.05, "local_steps": 10})
    runtime: str = "sequential"

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise FedmiError(f"unknown corruption '{unknown[0] if unknown else ''}'; kinds: {', '.join(KINDS)}")
        for f in self.fractions:
            check_number("corrupted fraction", f, 0, 1, high_open=True)
        if not self.aggregators:
            raise FedmiError("give at least one aggregator")
        for text in self.aggregators:
            make_aggregator(text)  # parse errors now, not after an hour
        for name in ("repeats", "rounds"):
            if getattr(self, name) < 1:
                raise FedmiError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.local_method()

    def local_method(self):
        options = {k: v for k, v in self.trainer.items() if k != "name"}
        return make_method(self.trainer.get("name", "fedavg"), **options)


def corrupted_count(fraction: float, sites: int) -> int:
    """Sites marked for a fraction: round(fraction x sites), at least one for a fraction above 0."""
    return 0 if fraction == 0 else max(1, int(round(fraction * sites)))


@dataclass
class RobustnessResult:
    dataset: str
    sites: list[str]
    config: RobustnessConfig
    metric: str
    # aggregator -> kind ("clean" for fraction 0) -> fraction (as text) -> summary over repeats
    scores: dict[str, dict[str, dict[str, dict]]]
    corrupted: dict[str, list[str]]  # "repeat r, fraction f" -> the sites marked
    rejected: dict[str, int] = field(default_factory=dict)  # "aggregator / kind / fraction" -> updates refused
    failed: dict[str, str] = field(default_factory=dict)  # "aggregator / kind / fraction" -> why it could not run

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "sites": self.sites, "config": asdict(self.config), "metric": self.metric,
                "scores": self.scores, "corrupted": self.corrupted, "rejected": self.rejected, "failed": self.failed}


def _corrupt_data(kind: str, sites: list[SiteData], marked: set[str], strength: float, num_classes: int,
                  seed: int) -> list[SiteData]:
    out = []
    for i, s in enumerate(sites):
        if s.name not in marked:
            out.append(s)
            continue
        g = torch_generator(Stream.SIMULATION, seed, 7, i)
        corrupt = DATA_CORRUPTIONS[kind]
        out.append(corrupt(s, strength, num_classes, g) if kind == "label_flip" else corrupt(s, strength, g))
    return out


def run_robustness(fed: Federation, cfg: RobustnessConfig,
                   advance: Callable[[str], None] | None = None) -> RobustnessResult:
    """Run the protocol; `advance(note)` after each federated run (for a progress bar)."""
    metric = fed.task.primary
    values: dict[str, dict[str, dict[str, list]]] = {a: {} for a in cfg.aggregators}
    corrupted: dict[str, list[str]] = {}
    rejected: dict[str, int] = {}
    failed: dict[str, str] = {}
    num_classes = max(2, fed.task.num_outputs)
    for rep in range(cfg.repeats):
        seed = repeat_seed(cfg.seed, rep)
        sites = fed.split(seed, cfg.test_fraction)
        names = [s.name for s in sites]
        order = [names[i] for i in numpy_generator(Stream.SIMULATION, seed, 11).permutation(len(names))]
        model = build_model(cfg.model, fed.input_shape, seed, fed.task.num_outputs, cfg.model_options)
        init = P.clone(model.state_dict())
        for fraction in cfg.fractions:
            marked = set(order[:corrupted_count(fraction, len(names))])
            corrupted[f"repeat {rep}, fraction {fraction:g}"] = sorted(marked)
            for kind in (["clean"] if not marked else cfg.kinds):
                strength = cfg.strength.get(kind, DEFAULT_STRENGTH.get(kind))
                method = cfg.local_method()
                train_sites = sites
                if kind in DATA_CORRUPTIONS:
                    train_sites = _corrupt_data(kind, sites, marked, strength, num_classes, seed)
                elif kind in UPDATE_CORRUPTIONS:
                    method = CorruptedUpdates(method, kind, sorted(marked), cfg.strength.get(kind))
                for text in cfg.aggregators:
                    key = f"{fraction:g}"
                    tag = f"{text} / {kind} / {key}"
                    runtime = make_runtime(cfg.runtime, model, train_sites, fed.task)
                    try:
                        # a model broken by the corrupted sites is what this protocol measures
                        result = Runner(runtime, method, make_aggregator(text, 1.0, method), rounds=cfg.rounds,
                                        seed=seed, evaluate_every=0, stop_on_divergence=False).run(init)
                    except FedmiError as e:  # this aggregator cannot run here (Krum with too few updates left)
                        failed.setdefault(tag, str(e))
                        values[text].setdefault(kind, {}).setdefault(key, []).append(None)
                        continue
                    finally:
                        runtime.close()
                    final = result.history[-1]["test"]
                    defined = [v for n in names if (v := final[n].get(metric)) is not None]
                    score = float(np.mean(defined)) if defined else None  # a one-class test split has no AUC
                    values[text].setdefault(kind, {}).setdefault(key, []).append(score)
                    refused = sum(len(r["rejected"]) for r in result.history)
                    if refused:
                        rejected[tag] = rejected.get(tag, 0) + refused
                    if advance is not None:
                        advance(f"repeat {rep + 1}: {kind} {fraction:g}, {text}")
    scores = {a: {k: {f: summarize(v) for f, v in by_f.items()} for k, by_f in by_kind.items()}
              for a, by_kind in values.items()}
    return RobustnessResult(fed.name, fed.site_names, cfg, metric, scores, corrupted, rejected, failed)


def work_units(fed: Federation, cfg: RobustnessConfig) -> int:
    corrupted = sum(1 for f in cfg.fractions if f > 0)
    clean = sum(1 for f in cfg.fractions if f == 0)
    return cfg.repeats * len(cfg.aggregators) * (clean + corrupted * len(cfg.kinds))


def clean_reference(result: RobustnessResult) -> tuple[str, float | None]:
    """(the aggregator drops are measured against, its clean score): the sample-weighted mean if it
    was run, else the first aggregator; the score is None without a clean (fraction 0) run."""
    reference = "weighted_mean" if "weighted_mean" in result.scores else result.config.aggregators[0]
    return reference, result.scores[reference].get("clean", {}).get("0", {}).get("mean")


def table_columns(result: RobustnessResult) -> list[tuple[str, str]]:
    """(kind, fraction) of each score column: the clean federation, then each kind at each fraction."""
    cols = [("clean", "0")] if any(f == 0 for f in result.config.fractions) else []
    return cols + [(k, f"{f:g}") for k in result.config.kinds for f in result.config.fractions if f > 0]


def best_aggregators(result: RobustnessResult, budget: float = 0.02) -> dict[str, dict]:
    """Per kind: the aggregator with the best mean score at the largest fraction, its drop against the
    clean federation with the sample-weighted mean (else the first aggregator), and whether the drop
    is within `budget`."""
    largest = f"{max(result.config.fractions):g}"
    _, clean = clean_reference(result)
    out = {}
    for kind in result.config.kinds:
        candidates = [(s[kind][largest]["mean"], a) for a, s in result.scores.items()
                      if kind in s and largest in s[kind] and s[kind][largest]["mean"] is not None]
        if not candidates or clean is None:
            continue
        score, aggregator = max(candidates)
        out[kind] = {"aggregator": aggregator, "score": score, "drop": clean - score,
                     "within_budget": clean - score <= budget, "fraction": float(largest)}
    return out


def worst_drops(result: RobustnessResult) -> dict[str, float | None]:
    """Per aggregator, its largest drop over the kinds at the largest fraction, against the clean
    federation with the weighted mean (None where a kind has no score): the aggregator with the
    smallest one holds up best whatever the corruption."""
    largest = f"{max(result.config.fractions):g}"
    _, clean = clean_reference(result)
    out: dict[str, float | None] = {}
    for agg, by_kind in result.scores.items():
        means = [by_kind.get(k, {}).get(largest, {}).get("mean") for k in result.config.kinds]
        out[agg] = None if clean is None or any(m is None for m in means) else max(clean - m for m in means)
    return out


def _cell(text: str) -> str:
    """A pipeline text inside a Markdown table cell (its `|` would end the cell)."""
    return text.replace("|", "\\|")


def markdown_table(result: RobustnessResult) -> str:
    cols = table_columns(result)
    head = " | ".join("clean" if k == "clean" else f"{k} {float(f):.0%}" for k, f in cols)
    lines = [f"# Corrupted sites: {result.dataset}", "",
             f"Mean over the {len(result.sites)} sites' test splits (where defined) of the final global model's "
             f"{result.metric.upper()}, mean ± std over {result.config.repeats} repeats; {result.config.rounds} "
             f"rounds, model {result.config.model}. Test data are never corrupted.", "",
             f"| Aggregation | {head} |", "|---|" + "---:|" * len(cols)]
    for agg, by_kind in result.scores.items():
        cells = [format_summary(by_kind[k][f]) if k in by_kind and f in by_kind[k] else "–" for k, f in cols]
        lines.append(f"| `{_cell(agg)}` | " + " | ".join(cells) + " |")
    best = best_aggregators(result)
    if best:
        lines += ["", "Best aggregator at the largest fraction, against the clean federation with the weighted "
                  "mean:", ""]
        for kind, b in best.items():
            lines.append(f"- {kind}: `{b['aggregator']}` {b['score']:.3f}, drop {b['drop']:+.3f} "
                         f"({'within' if b['within_budget'] else 'beyond'} 0.02)")
    worst = {a: d for a, d in worst_drops(result).items() if d is not None}
    if worst and max(result.config.fractions) > 0:
        lines += ["", f"Largest drop over every kind at {max(result.config.fractions):.0%}, per aggregator "
                  "(smallest first):", ""]
        lines += [f"- `{a}`: {d:+.3f}" for a, d in sorted(worst.items(), key=lambda kv: kv[1])]
    if result.failed:
        lines += ["", "Runs that could not be made (n/a above):", ""]
        lines += [f"- {tag}: {why}" for tag, why in result.failed.items()]
    if result.rejected:
        lines += ["", "Updates refused by the server's checks (non-finite or malformed; never folded in):", ""]
        lines += [f"- {tag}: {n}" for tag, n in result.rejected.items()]
    return "\n".join(lines) + "\n"


def plot_heatmap(result: RobustnessResult, path: Path) -> None:
    """One panel per corrupted fraction: aggregators x kinds, coloured by the drop against the clean
    weighted mean (red: worse; grey-red where undefined), annotated with the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [f"{f:g}" for f in result.config.fractions if f > 0]
    reference, clean = clean_reference(result)
    aggs, kinds = list(result.scores), result.config.kinds
    if not fractions:  # only the clean federation: one panel of its scores
        fractions, kinds = ["0"], ["clean"]
    fig, axes = plt.subplots(1, max(1, len(fractions)), figsize=(1.3 * len(kinds) * max(1, len(fractions)) + 3,
                                                                 0.45 * len(aggs) + 2), squeeze=False)
    for panel, (ax, f) in enumerate(zip(axes[0], fractions)):
        grid = np.full((len(aggs), len(kinds)), np.nan)
        for i, a in enumerate(aggs):
            for j, k in enumerate(kinds):
                mean = result.scores[a].get(k, {}).get(f, {}).get("mean")
                if mean is not None:
                    grid[i, j] = mean
        drop = (clean - grid) if clean is not None else grid
        image = ax.imshow(np.nan_to_num(drop, nan=0.3), cmap="YlOrRd", vmin=0.0, vmax=0.2, aspect="auto")
        for i in range(len(aggs)):
            for j in range(len(kinds)):
                ax.text(j, i, "n/a" if math.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center",
                        fontsize=8)
        ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right")
        ax.set_yticks(range(len(aggs)), aggs if panel == 0 else [""] * len(aggs))
        ax.set_title("clean federation" if f == "0" else f"{float(f):.0%} of sites corrupted")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{result.metric.upper()} drop vs clean {reference}")
    fig.suptitle(f"Corrupted sites: {result.dataset} ({result.metric.upper()}, mean of {result.config.repeats} "
                 "repeats; colour: drop)", y=1.03)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_robustness_report(result: RobustnessResult, out: Path) -> list[Path]:
    results = {**result.to_json(), "best": best_aggregators(result), "worst_drops": worst_drops(result)}
    return write_protocol_files(out, ROBUSTNESS, results, markdown_table(result), "heatmap.png",
                                lambda path: plot_heatmap(result, path))
