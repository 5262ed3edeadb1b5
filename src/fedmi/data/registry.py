"""Dataset names the CLI and configs accept, and what is embedded."""

from __future__ import annotations

from pathlib import Path

from fedmi.data.csv_features import load_csv
from fedmi.data.federation import Federation
from fedmi.data.heart_disease import load_heart_disease
from fedmi.data.medmnist import EMBEDDED as MEDMNIST
from fedmi.data.medmnist import load_medmnist
from fedmi.data.synthetic_adni import make_synthetic_adni
from fedmi.errors import FedmiError

DATASETS = ("heart-disease", "synthetic-adni", *MEDMNIST)


def load_federation(
    spec: str,
    *,
    site_column: str = "site",
    label_column: str = "label",
    split_column: str | None = None,
    positive_label: str | None = None,
    num_sites: int = 4,
    partition: str = "iid",
    alpha: float = 1.0,
    shift_strength: float = 1.0,
    max_samples: int | None = None,
    seed: int = 0,
) -> Federation:
    """`spec` is an embedded dataset name, `csv:PATH` or `npz:PATH` (a MedMNIST-format file)."""
    if spec.startswith("csv:"):
        return load_csv(spec[4:], site_column, label_column, split_column, positive_label)
    if spec.startswith("npz:"):
        return load_medmnist(Path(spec[4:]).stem, num_sites, partition, alpha, shift_strength, seed,
                             max_samples, path=Path(spec[4:]))
    if spec == "heart-disease":
        return load_heart_disease()
    if spec == "heart-disease-flamby":
        return load_heart_disease(flamby_split=True)
    if spec == "synthetic-adni":
        return make_synthetic_adni(seed)
    if spec in MEDMNIST:
        return load_medmnist(spec, num_sites, partition, alpha, shift_strength, seed, max_samples)
    raise FedmiError(f"unknown dataset '{spec}'; choose one of {', '.join(DATASETS)}, "
                     "heart-disease-flamby, csv:PATH or npz:PATH")


def describe_datasets() -> list[dict]:
    """One entry per embedded dataset: sites with sizes and class balance."""
    out = []
    for name in DATASETS:
        fed = load_federation(name)
        out.append({
            "name": name,
            "description": fed.description,
            "kind": fed.kind,
            "input_shape": list(fed.input_shape),
            "synthetic": fed.synthetic,
            "label_names": list(fed.label_names),
            "sites": [{"name": s.name, "n": s.n, "class_counts": s.class_counts()} for s in fed.sites],
        })
    return out
