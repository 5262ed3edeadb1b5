"""The privacy-utility protocol (`fedmi privacy`, survey §VI-A): what each privacy budget costs.

For one run config (dataset, model, trainer, rounds) it trains, in every repeat, the non-private
reference, the same run with clipping alone (no noise: what bounding the updates or gradients
costs by itself), and the run at each requested ε (the noise calibrated to it before training) or
noise multiplier. Repeat r uses the run's seed for r = 0 and a seed derived from it after (its own
split of every site and its own initial model), as `fedmi table2` does; the settings of one repeat
share that split and model. The final global model is scored on each site's own test split.

It writes `privacy.json` (every repeat's scores and budget), `table.md` (per setting: ε at δ,
each site's primary metric and their mean over sites, mean ± std over repeats) and
`privacy_utility.png` (ε against the mean over sites, the reference as a line); `fedmi report`
renders the folder.

    fedmi privacy configs/heart-disease.yaml --level sample --clip-norm 1.0 --epsilons 1,4,16
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import Field, model_validator

from fedmi.core.metrics import format_summary, summarize
from fedmi.core.rng import repeat_seed
from fedmi.core.schema import Settings
from fedmi.experiments.config import PrivacyConfig, RunConfig
from fedmi.experiments.outputs import PRIVACY, write_protocol_files



class PrivacyUtilityConfig(Settings):
    """The budgets to compare, at one level of privacy (see `PrivacyConfig`).

    Example (YAML, beside a run config's fields under `privacy_utility:`, or from the command line)::

        level: sample
        clip_norm: 1.0
        epsilons: [1, 4, 16]
        repeats: 5
    """

    level: Literal["client", "sample"] = "sample"
    noise_at: Literal["server", "site"] = "server"  # client level: once on the sum, or at each site
    clip_norm: float = Field(gt=0)
    epsilons: list[float] = Field(default_factory=list)
    noise_multipliers: list[float] = Field(default_factory=list)
    delta: float = Field(1e-5, gt=0, lt=1)
    repeats: int = Field(5, ge=1, le=100)
    clipped: bool = True  # also run clipping without noise

    @model_validator(mode="after")
    def _budgets(self) -> "PrivacyUtilityConfig":
        if not self.epsilons and not self.noise_multipliers:
            raise ValueError("give the budgets to compare: epsilons, noise_multipliers, or both")
        if any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ValueError(f"every epsilon must be a positive number, got {self.epsilons}")
        if any(not (z > 0 and math.isfinite(z)) for z in self.noise_multipliers):
            raise ValueError(f"every noise multiplier must be a positive number, got {self.noise_multipliers}")
        return self

    def settings(self) -> list[tuple[str, PrivacyConfig | None]]:
        """(label, privacy) of every setting, the reference first."""
        out: list[tuple[str, PrivacyConfig | None]] = [("no privacy", None)]
        common = {"level": self.level, "noise_at": self.noise_at, "clip_norm": self.clip_norm, "delta": self.delta}
        if self.clipped:
            out.append((f"clipped to {self.clip_norm:g}, no noise", PrivacyConfig(**common, noise_multiplier=0.0)))
        out += [(f"target ε {e:g}", PrivacyConfig(**common, target_epsilon=e)) for e in sorted(self.epsilons)]
        out += [(f"noise multiplier {z:g}", PrivacyConfig(**common, noise_multiplier=z))
                for z in sorted(self.noise_multipliers, reverse=True)]
        return out


@dataclass
class PrivacyUtilityResult:
    dataset: str
    sites: list[str]
    metric: str
    run: dict  # the base run config, as plain data
    config: dict  # the protocol's settings
    # label -> one entry per repeat: {"scores": {site: metric}, "mean": mean over sites, "epsilon": spent, "noise"}
    repeats: dict[str, list[dict]] = field(default_factory=dict)
    synthetic: bool = False

    def summary(self) -> dict[str, dict]:
        """label -> {"sites": {site: summary}, "mean": summary, "epsilon": summary} over repeats."""
        out = {}
        for label, reps in self.repeats.items():
            eps = [r["epsilon"] for r in reps]
            out[label] = {"sites": {s: summarize([r["scores"].get(s) for r in reps]) for s in self.sites},
                          "mean": summarize([r["mean"] for r in reps]),
                          "epsilon": summarize(eps) if all(e is not None and math.isfinite(e) for e in eps) else None,
                          "infinite": any(e is not None and math.isinf(e) for e in eps),
                          "noise_multiplier": summarize([r["noise"] for r in reps if r["noise"] is not None])}
        return out

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "sites": self.sites, "metric": self.metric, "run": self.run,
                "config": self.config, "repeats": self.repeats, "summary": self.summary(),
                "synthetic": self.synthetic}


def run_privacy_utility(base: RunConfig, cfg: PrivacyUtilityConfig,
                        advance: Callable[[str], None] | None = None) -> PrivacyUtilityResult:
    """Every setting of `cfg` in every repeat; `advance(note)` after each run (a progress bar's)."""
    from fedmi.experiments.federated_run import federation_for, privacy_spent, run_federated

    fed = federation_for(base.data, base.seed)
    metric = fed.task.primary
    result = PrivacyUtilityResult(fed.name, fed.site_names, metric, base.model_dump(mode="json"),
                                  cfg.model_dump(mode="json"), synthetic=fed.synthetic)
    for rep in range(cfg.repeats):
        seed = repeat_seed(base.seed, rep)
        for label, privacy in cfg.settings():
            run = run_federated(base.model_copy(update={"seed": seed, "privacy": privacy, "evaluate_every": 0}))
            final = run.result.history[-1]["test"]
            scores = {s: final[s].get(metric) for s in result.sites if s in final}
            defined = [v for v in scores.values() if v is not None]  # a one-class test split has none
            result.repeats.setdefault(label, []).append({
                "seed": seed, "scores": scores, "mean": float(np.mean(defined)) if defined else None,
                "epsilon": None if privacy is None else privacy_spent(run.result.history[-1], privacy)["epsilon"],
                "noise": run.result.history[-1].get("noise_multiplier")})
            if advance is not None:
                advance(f"repeat {rep + 1}: {label}")
    return result


def work_units(cfg: PrivacyUtilityConfig) -> int:
    return cfg.repeats * len(cfg.settings())


def epsilon_cell(s: dict) -> str:
    """A setting's ε over the repeats: one figure where they agree (a target), else mean ± std."""
    if s["epsilon"] is None:
        return "∞" if s["infinite"] else "–"
    mean, std = s["epsilon"]["mean"], s["epsilon"]["std"]
    return f"{mean:.3g}" if not std or std < 1e-6 * mean else f"{mean:.3g}±{std:.2g}"


def markdown_table(result: PrivacyUtilityResult) -> str:
    cfg, summary = result.config, result.summary()
    level = {"client": "client level (DP-FedAvg: each site's update clipped, noise on the sum)",
             "sample": "sample level (DP-SGD at each site: each sample's gradient clipped, noise at every step; "
                       "ε is the largest over the sites)"}[cfg["level"]]
    if cfg["level"] == "client" and cfg.get("noise_at") == "site":
        level = ("client level, noise at the sites (each site's update clipped and noised before it leaves; "
                 "ε is each site's against the server)")
    lines = [f"# Privacy and utility: {result.dataset}", "",
             f"{result.metric.upper()} of the final global model on each site's own test split and their mean over "
             f"sites, mean ± std over {cfg['repeats']} repeats (each its own split and initial model); "
             f"{result.run['rounds']} rounds, model {result.run['model']}, trainer {result.run['trainer']['name']}. "
             f"Privacy at {level}; ε at δ = {cfg['delta']:g} after the last round.", "",
             "| setting | ε | " + " | ".join(result.sites) + " | mean over sites |",
             "|---|---:|" + "---:|" * (len(result.sites) + 1)]
    for label, s in summary.items():
        cells = [format_summary(s["sites"][site]) for site in result.sites]
        lines.append(f"| {label} | {epsilon_cell(s) if label != 'no privacy' else '–'} | " + " | ".join(cells)
                     + f" | {format_summary(s['mean'])} |")
    reference = summary.get("no privacy", {}).get("sites", {})
    undefined = [site for site, v in reference.items() if v["mean"] is None]
    if undefined:
        lines += ["", f"n/a: {', '.join(undefined)}: {result.metric.upper()} is undefined where a test split holds "
                  "one class, as it did there in every repeat; the mean over sites leaves it out."]
    return "\n".join(lines) + "\n"


def plot_privacy_utility(result: PrivacyUtilityResult, path: Path) -> None:
    """ε (log scale) against the mean over sites, mean ± std over repeats; the reference and the
    clipped run without noise as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(s["epsilon"]["mean"], s["mean"]["mean"], s["mean"]["std"] or 0.0, label)
              for label, s in summary.items() if s["epsilon"] is not None and s["mean"]["mean"] is not None]
    points.sort()
    if points:
        xs, ys, errs, _ = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=f"{result.config['level']}-level DP")
    for label, style in (("no privacy", "-"), (next((k for k in summary if k.startswith("clipped")), ""), ":")):
        if label in summary and summary[label]["mean"]["mean"] is not None:
            ax.axhline(summary[label]["mean"]["mean"], color="grey", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"ε at δ = {result.config['delta']:g}")
    ax.set_ylabel(f"{result.metric.upper()}, mean over sites")
    ax.set_title(f"Privacy and utility: {result.dataset} ({result.config['repeats']} repeats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_privacy_report(result: PrivacyUtilityResult, out: Path) -> list[Path]:
    return write_protocol_files(out, PRIVACY, result.to_json(), markdown_table(result), "privacy_utility.png",
                                lambda path: plot_privacy_utility(result, path))
