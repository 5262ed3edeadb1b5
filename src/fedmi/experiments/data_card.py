"""Data cards: what each site holds, and how the sites differ, before anything is trained.

`data_card(fed)` lists per site the number of samples, the label distribution (or, for
segmentation, the share of pixels of each class and the images without foreground), the sample
shape and the intensity range. For images, `plot_intensity_histograms` draws each site's
intensity distribution in one panel (the survey's Fig. 3 view of domain shift: sites scanned
differently look different here first) and `plot_samples` a grid of a few images per site, with
the mask's outline for segmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmi.data.federation import Federation

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _class_name(fed: Federation, k: int) -> str:
    return fed.label_names[k] if k < len(fed.label_names) else str(k)


def data_card(fed: Federation) -> dict:
    """The federation's card: {"dataset", "description", "task", "synthetic", "input_shape",
    "label_names", "sites": [{"name", "n", "labels" or "pixels", "intensity", ...}], "skipped_files"}."""
    sites = []
    for site in fed.sites:
        entry: dict = {"name": site.name, "n": site.n}
        if fed.task.name == "segmentation":
            counts = np.bincount(site.y.reshape(-1), minlength=fed.task.num_outputs)
            entry["pixels"] = {_class_name(fed, k): float(c / counts.sum()) for k, c in enumerate(counts)}
            entry["images_without_foreground"] = int((site.y.reshape(site.n, -1).max(axis=1) == 0).sum())
        elif fed.task.name in ("binary", "multiclass"):
            entry["labels"] = {_class_name(fed, k): c for k, c in site.class_counts().items()}
        if site.groups is not None:
            entry["patients"] = int(len(np.unique(site.groups)))
        if site.cases is not None:
            entry["scored_cases"] = int(len(np.unique(site.cases)))  # what evaluation scores (tumours)
        x = site.x
        entry["intensity"] = {"min": float(x.min()), "mean": float(x.mean()), "std": float(x.std()),
                              "max": float(x.max())}
        sites.append(entry)
    card = {"dataset": fed.name, "description": fed.description, "task": fed.task.name, "synthetic": fed.synthetic,
            "kind": fed.kind, "input_shape": list(fed.input_shape), "label_names": list(fed.label_names),
            "sites": sites}
    if fed.common_test is not None:
        card["common_test"] = {"n": int(len(fed.common_test[1]))}
    if fed.skipped:
        card["skipped_files"] = [{"file": f, "reason": r} for f, r in fed.skipped]
    return card


def plot_intensity_histograms(fed: Federation, path: Path, bins: int = 64) -> Path:
    """One panel: each site's intensity histogram (density), a line per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = min(float(s.x.min()) for s in fed.sites)
    high = max(float(s.x.max()) for s in fed.sites)
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, site in enumerate(fed.sites):
        density, _ = np.histogram(site.x.reshape(-1), bins=edges, density=True)
        ax.plot((edges[:-1] + edges[1:]) / 2, density, color=PALETTE[i % len(PALETTE)], lw=1.6,
                label=f"{site.name} (n={site.n})")
    ax.set_xlabel("intensity" if fed.kind == "image" else "feature value (as loaded)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    title = f"{fed.name}: intensity distribution per site" + (" (SYNTHETIC DATA)" if fed.synthetic else "")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _middle(image: np.ndarray) -> np.ndarray:
    """A 2-D view of one sample (c, h, w) or (c, d, h, w): the first channel, the middle slice."""
    image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def plot_samples(fed: Federation, path: Path, per_site: int = 6, seed: int = 0) -> Path:
    """A grid: a row per site, `per_site` random images each (mask outlines for segmentation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = len(fed.sites)
    fig, axes = plt.subplots(rows, per_site, figsize=(1.6 * per_site, 1.7 * rows), squeeze=False)
    for r, site in enumerate(fed.sites):
        chosen = np.sort(rng.choice(site.n, size=min(per_site, site.n), replace=False))
        for c in range(per_site):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(chosen):
                continue
            i = chosen[c]
            ax.imshow(_middle(site.x[i]), cmap="gray")
            if fed.task.name == "segmentation":
                mask = site.y[i]
                mask = mask[mask.shape[0] // 2] if mask.ndim == 3 else mask
                if mask.any():
                    ax.contour(mask > 0, levels=[0.5], colors=PALETTE[1], linewidths=0.8)
            elif fed.task.name in ("binary", "multiclass"):
                ax.set_title(_class_name(fed, int(site.y[i])), fontsize=7)
        axes[r][0].text(-0.08, 0.5, site.name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{fed.name}: samples per site" + (" (SYNTHETIC DATA)" if fed.synthetic else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_data_card(fed: Federation, out: Path) -> list[Path]:
    """data_card.json, and for images intensity_histograms.png and samples.png, in `out`."""
    from fedmi.experiments.outputs import to_json

    out.mkdir(parents=True, exist_ok=True)
    (out / "data_card.json").write_text(to_json(data_card(fed), indent=2) + "\n")
    written = [out / "data_card.json"]
    written.append(plot_intensity_histograms(fed, out / "intensity_histograms.png"))
    if fed.kind == "image":
        written.append(plot_samples(fed, out / "samples.png"))
    return written
