"""UCI Heart Disease: four real hospitals, FLamby-compatible preprocessing.

Preprocessing (as FLamby's Fed-Heart-Disease):
- columns kept: age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak; the
  columns slope, ca and thal are dropped (mostly missing outside Cleveland);
- rows with any missing (`?`) value among the kept columns are dropped, leaving
  303 / 261 / 46 / 130 patients (Cleveland / Hungary / Switzerland / VA Long Beach);
- cp (chest pain type, 1-4) and restecg (0-2) are one-hot encoded with the first level
  dropped, giving 13 features;
- label = disease present (num > 0); with `label: severity`, three classes: no disease (num 0),
  mild (num 1), moderate to severe (num 2-4). Hungary records only 0 and 1, so its sites differ in
  which classes they hold, as real hospitals do.
`split: flamby` (or the dataset `heart-disease-flamby`) gives FLamby's fixed per-center split (66 % train, stratified, seed 43:
199/104, 172/89, 30/16, 85/45); otherwise the experiment draws its own splits.
Note that `chol` is 0 (in effect missing) in every Switzerland row; it is kept as FLamby keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from fedmi.core.tasks import BinaryTask, MulticlassTask
from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, Dataset, DatasetOptions

ASSETS = Path(__file__).parent / "assets" / "heart_disease"
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num"]
KEPT = COLUMNS[:10]
CENTERS = {  # file stem -> site name
    "cleveland": "Cleveland",
    "hungarian": "Hungary",
    "switzerland": "Switzerland",
    "va": "VA Long Beach",
}
ONE_HOT = {"cp": [1, 2, 3, 4], "restecg": [0, 1, 2]}


def _encode(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    cols, names = [], []
    for c in KEPT:
        if c in ONE_HOT:
            for level in ONE_HOT[c][1:]:  # first level dropped
                cols.append((df[c] == level).astype(np.float32).to_numpy())
                names.append(f"{c}={level}")
        else:
            cols.append(df[c].astype(np.float32).to_numpy())
            names.append(c)
    return np.stack(cols, axis=1), names


SEVERITY = ("no disease", "mild", "moderate to severe")


def load_heart_disease(flamby_split: bool = False, root: Path = ASSETS, label: str = "disease") -> Federation:
    sites, names = [], None
    for stem, site_name in CENTERS.items():
        df = pd.read_csv(root / f"processed.{stem}.data", header=None, names=COLUMNS, na_values="?")
        df = df.dropna(subset=KEPT).reset_index(drop=True)
        x, names = _encode(df)
        y = (df["num"] > 0).astype(np.int64).to_numpy()
        stratum = y  # FLamby's split stratifies by disease present, whatever the label
        if label == "severity":
            y = np.minimum(df["num"].to_numpy(), 2).astype(np.int64)
        test_mask = None
        if flamby_split:
            from sklearn.model_selection import train_test_split  # ~2 s to import; only FLamby's split needs it

            # FLamby stratifies only when each class has more than two members.
            stratify = stratum if min(np.bincount(stratum, minlength=2)) > 2 else None
            _, test_idx = train_test_split(np.arange(len(y)), train_size=0.66, test_size=0.34,
                                           random_state=43, shuffle=True, stratify=stratify)
            test_mask = np.zeros(len(y), dtype=bool)
            test_mask[test_idx] = True
        sites.append(Site(site_name, x, y, test_mask))
    if label == "severity":
        return Federation(name="heart-disease", sites=sites, kind="tabular", feature_names=names,
                          description="UCI Heart Disease, 4 hospitals (FLamby preprocessing), label: severity "
                                      "(none / mild / moderate to severe)",
                          label_names=SEVERITY, task=MulticlassTask(3))
    return Federation(
        name="heart-disease",
        sites=sites,
        kind="tabular",
        feature_names=names,
        description="UCI Heart Disease, 4 hospitals (FLamby preprocessing), label: disease present",
        label_names=("no disease", "disease"),
        task=BinaryTask(),
    )


class HeartDiseaseOptions(DatasetOptions):
    split: Literal["random", "flamby"] = Field(
        "random", description="random: repeated stratified splits; flamby: FLamby's fixed split")
    label: Literal["disease", "severity"] = Field(
        "disease", description="disease: present or not (binary); severity: none / mild / moderate to severe")


@DATASETS.register()
class HeartDisease(Dataset):
    """UCI Heart Disease: four real hospitals (embedded)."""

    name = "heart-disease"
    Options = HeartDiseaseOptions
    embedded = True

    def load(self, options: HeartDiseaseOptions, seed: int) -> Federation:
        return load_heart_disease(flamby_split=options.split == "flamby", label=options.label)


class FlambyOptions(HeartDiseaseOptions):
    split: Literal["random", "flamby"] = "flamby"


@DATASETS.register()
class HeartDiseaseFlamby(HeartDisease):
    """heart-disease with FLamby's fixed train/test split."""

    name = "heart-disease-flamby"
    Options = FlambyOptions
    embedded = False
