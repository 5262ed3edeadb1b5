"""`fedmi report RUN_DIR`: one self-contained HTML page from what a run or a protocol wrote.

The page holds the results table (a `fedmi run`'s final metrics per site, or `fedmi table2`'s
table), every plot the run wrote (convergence, per-site metrics), example predictions of the final
model on a few test images per site (segmentation: the predicted outline over the true one), the
data card (per-site counts, intensity histograms, samples) and the config. Images are embedded as
base64, so the file can be mailed or archived alone. Where the run's data cannot be loaded here
(a deployment's sites hold it), the page says so and shows the rest.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import yaml

from fedmi.core import params as P
from fedmi.errors import FedmiError, counted
from fedmi.experiments.outputs import AUDIT, CHECKPOINT, PRIVACY, RUN_CONFIG, TABLE2_SETTINGS, UNITS

log = logging.getLogger("fedmi")
REPORT = "report.html"

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1b1b; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.synthetic { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5rem 0.8rem; font-weight: 600; }
.note { color: #555; } table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
th { background: #f3f5f8; } figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; } pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; }
"""


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(text: str, skip: str = "") -> str:
    """The pipe tables of a Markdown file as HTML tables, other lines (but `skip`) as paragraphs."""
    parts, rows = [], []

    def flush() -> None:
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not set(r) <= set("|-: ")]
            parts.append(_table(cells[0], cells[1:]))
            rows.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.strip() and not line.startswith("#") and line.strip() != skip.strip():
            parts.append(f"<p class='note'>{html.escape(line.strip())}</p>")
    flush()
    return "\n".join(parts)


def _final_table(summary: dict) -> str:
    metrics = summary.get("table_metrics") or []
    rows = [[site, m.get("n", "")] + ["n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in metrics]
            for site, m in (summary.get("final") or {}).items()]
    return _table(["Site", "test n", *[k.upper() for k in metrics]], rows)


def _load(run_dir: Path) -> dict:
    """What kind of folder this is, and what it says: kind, title, data config, model, seed, ..."""
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        config = summary.get("config") or {}
        return {"kind": "run", "summary": summary, "data": config.get("data"), "model": config.get("model"),
                "model_options": config.get("model_options") or {}, "seed": config.get("seed", 0),
                "test_fraction": (config.get("data") or {}).get("test_fraction", 0.2),
                "weights": run_dir / "model.safetensors", "dataset": summary.get("dataset", ""),
                "description": summary.get("description", ""), "synthetic": summary.get("synthetic", False),
                "config_text": (run_dir / RUN_CONFIG).read_text() if (run_dir / RUN_CONFIG).is_file()
                else yaml.safe_dump(config, sort_keys=False)}
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        settings = json.loads((run_dir / TABLE2_SETTINGS).read_text()) if (run_dir / TABLE2_SETTINGS).is_file() else {}
        config = settings.get("config") or results.get("config") or {}
        models = sorted((run_dir / "models").glob("*.safetensors")) if (run_dir / "models").is_dir() else []
        preferred = [m for m in models if m.stem.startswith("fedavg_")] or models
        return {"kind": "table2", "results": results, "data": settings.get("data"), "model": config.get("model"),
                "model_options": config.get("model_options") or {}, "seed": config.get("seed", 0),
                "test_fraction": config.get("test_fraction", 0.2), "weights": preferred[0] if preferred else None,
                "dataset": results.get("dataset", ""), "description": results.get("description", ""),
                "synthetic": results.get("synthetic", False), "config_text": json.dumps(settings or config, indent=2)}
    if (run_dir / PRIVACY).is_file():
        results = json.loads((run_dir / PRIVACY).read_text())
        run = results.get("run") or {}
        return {"kind": "privacy", "results": results, "data": run.get("data"), "model": run.get("model"),
                "model_options": run.get("model_options") or {}, "seed": run.get("seed", 0),
                "test_fraction": (run.get("data") or {}).get("test_fraction", 0.2), "weights": None,
                "dataset": results.get("dataset", ""), "description": "", "synthetic": results.get("synthetic", False),
                "config_text": json.dumps({"run": run, "privacy_utility": results.get("config")}, indent=2)}
    if (run_dir / AUDIT).is_file():
        results = json.loads((run_dir / AUDIT).read_text())
        cfg = results.get("config") or {}
        return {"kind": "audit", "results": results, "data": {"dataset": cfg.get("dataset")}, "model": None,
                "model_options": {}, "seed": cfg.get("seed", 0), "test_fraction": 0.2, "weights": None,
                "dataset": results.get("dataset", ""), "description": "", "synthetic": False,
                "config_text": json.dumps(cfg, indent=2)}
    if (run_dir / UNITS).is_file():
        done = sum(1 for line in (run_dir / UNITS).read_text().splitlines() if line.strip())
        raise FedmiError(f"{run_dir}: an unfinished Table II protocol ({counted(done, 'unit')} of work done, no "
                         f"results.json yet): continue it with fedmi table2 --resume {run_dir}, then report it")
    if (run_dir / RUN_CONFIG).is_file() and (run_dir / "metrics.jsonl").is_file():
        return _unfinished(run_dir)
    raise FedmiError(f"{run_dir}: not a fedmi run or protocol folder (no summary.json or results.json)")


def _unfinished(run_dir: Path) -> dict:
    """An interrupted run's folder: its rounds so far (metrics.jsonl), its config, its checkpoint's model."""
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when the run stopped
            break
    if not records:
        raise FedmiError(f"{run_dir}: a run that stopped before its first round finished: nothing to report; "
                         f"continue it with fedmi run --resume {run_dir}")
    final = next((r["test"] for r in reversed(records) if r.get("test")), {})
    first = next(iter(final.values()), {})
    metrics = [k for k in first if k not in ("n", "one_class", "loss") and "_" not in k]
    data = config.get("data") or {}
    return {"kind": "unfinished", "summary": {"final": final, "table_metrics": metrics}, "history": records,
            "rounds": (records[-1].get("round"), config.get("rounds")), "data": data, "model": config.get("model"),
            "model_options": config.get("model_options") or {}, "seed": config.get("seed", 0),
            "test_fraction": data.get("test_fraction", 0.2), "weights": run_dir / CHECKPOINT,
            "dataset": data.get("dataset", ""), "description": "", "synthetic": False,
            "config_text": (run_dir / RUN_CONFIG).read_text()}


def _data_sections(info: dict, scratch: Path) -> tuple[str, str]:
    """(the data card section, the example predictions section) where the data loads here."""
    from fedmi.experiments.config import DataConfig
    from fedmi.experiments.data_card import data_card, plot_intensity_histograms, plot_samples
    from fedmi.experiments.federated_run import federation_for

    if not info.get("data"):
        return "<p class='note'>No data section in this folder's config: no data card.</p>", ""
    try:
        fed = federation_for(DataConfig(**info["data"]), int(info["seed"]))
    except (FedmiError, OSError, ValueError) as e:
        return f"<p class='note'>The data could not be loaded here ({html.escape(str(e))}); no data card.</p>", ""
    card = data_card(fed)
    rows = []
    for site in card["sites"]:
        detail = ", ".join(f"{k} {v:.1%}" for k, v in site["pixels"].items()) if "pixels" in site else \
            ", ".join(f"{k} {v}" for k, v in site.get("labels", {}).items())
        i = site["intensity"]
        rows.append([site["name"], site["n"], site.get("patients", ""), detail, f"{i['mean']:.3f} ± {i['std']:.3f}"])
    section = _table(["Site", "n", "patients", "pixels" if fed.task.name == "segmentation" else "labels",
                      "intensity mean ± std"], rows)
    section += _image(plot_intensity_histograms(fed, scratch / "hist.png"), "Intensity distribution per site")
    predictions = ""
    if fed.kind == "image":
        section += _image(plot_samples(fed, scratch / "samples.png"), "Samples per site")
        weights = info.get("weights")
        if info.get("model") and weights is not None and Path(weights).is_file():
            path = plot_predictions(fed, info["model"], info["model_options"], P.load(weights), int(info["seed"]),
                                    float(info["test_fraction"]), scratch / "predictions.png")
            predictions = _image(path, f"Predictions of {Path(weights).name} on test images of each site")
    return section, predictions


def plot_predictions(fed, model_name: str, model_options: dict, params: P.ParamsT, seed: int, test_fraction: float,
                     path: Path, per_site: int = 4) -> Path:
    """A grid: per site, its first test images with the model's prediction (segmentation: the predicted
    outline in orange over the true one in blue; classification: the true class and p(positive))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from fedmi.experiments.data_card import _middle
    from fedmi.models import build_model

    model = build_model(model_name, fed.input_shape, seed, fed.task.num_outputs, model_options)
    model.load_state_dict(params)
    model.eval()
    sites = fed.split(seed, test_fraction)
    fig, axes = plt.subplots(len(sites), per_site, figsize=(1.8 * per_site, 1.9 * len(sites)), squeeze=False)
    for r, site in enumerate(sites):
        x, y = site.x_test[:per_site], site.y_test[:per_site]
        with torch.no_grad():
            scores = fed.task.scores(model(x)).numpy() if len(x) else np.zeros(0)
        for c in range(per_site):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(x):
                continue
            ax.imshow(_middle(x[c].numpy()), cmap="gray")
            if fed.task.name == "segmentation":
                for mask, color in ((y[c].numpy(), "#0072B2"), (scores[c].argmax(0), "#E69F00")):
                    mask = mask[mask.shape[0] // 2] if mask.ndim == 3 else mask
                    if mask.any():
                        ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=0.9)
            elif fed.task.name == "binary":
                ax.set_title(f"{fed.label_names[int(y[c])]}\np={float(scores[c]):.2f}", fontsize=7)
        axes[r][0].text(-0.08, 0.5, site.name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    legend = "blue: true outline, orange: predicted" if fed.task.name == "segmentation" else \
        f"title: true class, p = predicted probability of {fed.label_names[-1]}"
    fig.suptitle(f"{fed.name}: test images ({legend})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html_report(run_dir: Path) -> Path:
    """Render `run_dir`'s report.html (see the module's description) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedmiError(f"no run folder at {run_dir}")
    info = _load(run_dir)
    kind = {"run": "run", "unfinished": "run (unfinished)", "table2": "Table II protocol",
            "privacy": "privacy-utility protocol", "audit": "leakage audit"}[info["kind"]]
    title = f"fedmi {kind}: {info['dataset']}"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>{html.escape(info['description'])}</p>"]
    if info["kind"] == "unfinished":
        done, total = info["rounds"]
        log.warning("%s is an unfinished run (round %s of %s): the report shows its rounds so far", run_dir, done, total)
        parts.append(f"<p class='synthetic'>UNFINISHED: this run stopped after round {done} of {total}; the table "
                     f"is its last evaluated round's, the example predictions its last checkpoint's. Continue it "
                     f"with: fedmi run --resume {html.escape(str(run_dir))}</p>")
    if info["synthetic"]:
        parts.append("<p class='synthetic'>SYNTHETIC DATA: results say nothing about real patients.</p>")
    parts.append("<h2>Results</h2>")
    if info["kind"] in ("run", "unfinished"):
        parts.append(_final_table(info["summary"]))
        privacy = info["summary"].get("privacy")
        if privacy:
            what = ("DP-SGD at each site, every sample's gradient clipped to norm" if privacy["level"] == "sample" else
                    "each site's update clipped and noised at the site, to norm" if privacy.get("noise_at") == "site"
                    else "each site's update clipped to norm")
            by_site = "".join(f"; {html.escape(site)} {eps:.3g}" for site, eps in privacy.get("site_epsilon", {}).items())
            parts.append(f"<p class='note'>Differential privacy ({privacy['level']} level): epsilon "
                         f"{privacy['epsilon']:.3g} at delta {privacy['delta']:g}{' (the largest over the sites' if by_site else ''}"
                         f"{by_site}{')' if by_site else ''}; {what} {privacy['clip_norm']:g}, Gaussian noise multiplier "
                         f"{privacy['noise_multiplier']:.3g}.</p>")
    elif (run_dir / "table.md").is_file():
        parts.append(_markdown_table((run_dir / "table.md").read_text(), skip=info["description"]))
    skipped = (info.get("summary") or {}).get("skipped_files") or (info.get("results") or {}).get("skipped_files")
    if skipped:
        parts.append(f"<p class='note'>{counted(len(skipped), 'file')} left out while loading the data:</p>"
                     + _table(["file", "reason"], [[s["file"], s["reason"]] for s in skipped]))
    with tempfile.TemporaryDirectory() as scratch:
        plots = sorted(run_dir.glob("*.png"), key=lambda p: (p.name != "convergence.png", p.name))
        if info["kind"] == "unfinished" and info["summary"]["table_metrics"]:
            from fedmi.experiments.report import plot_convergence

            plots = [Path(scratch) / "convergence.png"]
            plot_convergence(info["history"], plots[0], f"{title}, rounds 1-{info['rounds'][0]}",
                             "auc" if "auc" in info["summary"]["table_metrics"] else info["summary"]["table_metrics"][0])
        if plots:
            parts.append("<h2>Plots</h2>")
            parts += [_image(p, p.stem.replace("_", " ")) for p in plots]
        card, predictions = _data_sections(info, Path(scratch))
        if predictions:
            parts += ["<h2>Example predictions</h2>", predictions]
        parts += ["<h2>Data card</h2>", card]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(info['config_text'])}</pre>"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}"
            "<script>document.body.dataset.rendered = 'yes';</script></body></html>")
    out = run_dir / REPORT
    out.write_text(page, encoding="utf-8")
    return out
