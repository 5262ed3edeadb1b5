"""A generic CSV source: one row per subject, a site column, a label column, feature columns.

This is the survey's ADNI setting (90 AAL gray-matter volumes per subject, AD vs NC, site =
ADNI-1 / ADNI-2): a user with such a table runs the survey's experiment with one command,
`fedmi table2 --dataset csv:PATH`. Every column other than the site, label and split columns
is a feature and must be numeric and complete. An optional split column holding `train` or
`test` gives a fixed split instead of random repeats.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, POSITIVE_LABEL_HELP, Dataset, DatasetOptions
from fedmi.errors import FedmiError


def _rows(mask: pd.Series) -> str:
    lines = (np.flatnonzero(mask.to_numpy()) + 2).tolist()  # +2: header is line 1
    shown = ", ".join(map(str, lines[:5]))
    return f"line{'s' if len(lines) > 1 else ''} {shown}{' ...' if len(lines) > 5 else ''}"


def _labels(col: pd.Series, path: Path, name: str, positive_label: str | None) -> np.ndarray:
    if col.isna().any():
        raise FedmiError(f"{path}: label column '{name}' is empty at {_rows(col.isna())}")
    if positive_label is not None:
        values = col.astype(str).str.strip()
        if positive_label not in set(values):
            raise FedmiError(f"{path}: positive label '{positive_label}' never occurs in column '{name}' "
                             f"(values: {sorted(set(values))[:10]})")
        return (values == positive_label).to_numpy().astype(np.int64)
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.isna().any() or not set(numeric.unique()) <= {0, 1}:
        raise FedmiError(f"{path}: label column '{name}' must hold 0/1 (values: "
                         f"{sorted(map(str, col.unique()))[:10]}); name the positive class with --positive-label")
    return numeric.to_numpy().astype(np.int64)


def load_csv(
    path: str | Path,
    site_column: str = "site",
    label_column: str = "label",
    split_column: str | None = None,
    positive_label: str | None = None,
    name: str | None = None,
) -> Federation:
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no CSV file at {path}")
    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as e:
        raise FedmiError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    # pandas silently renames a repeated column (label -> label.1), which would make it a feature
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise FedmiError(f"{path}: column name(s) {repeated} appear more than once in the header")
    if any(not c.strip() for c in header):
        raise FedmiError(f"{path}: column {[c.strip() for c in header].index('') + 1} of the header has no name "
                         "(an index column?); name it or remove it")
    for role, col in (("site", site_column), ("label", label_column), ("split", split_column)):
        if col is not None and col not in df.columns:
            raise FedmiError(f"{path}: no {role} column '{col}' (columns: {', '.join(map(str, df.columns[:12]))}"
                             f"{' ...' if len(df.columns) > 12 else ''})")
    if df[site_column].isna().any():
        raise FedmiError(f"{path}: site column '{site_column}' is empty at {_rows(df[site_column].isna())}")
    y = _labels(df[label_column], path, label_column, positive_label)

    test = None
    if split_column is not None:
        split = df[split_column].astype(str).str.strip().str.lower()
        bad = ~split.isin(["train", "test"])
        if bad.any():
            raise FedmiError(f"{path}: split column '{split_column}' must hold 'train' or 'test', "
                             f"not '{df[split_column][bad].iloc[0]}' ({_rows(bad)})")
        test = (split == "test").to_numpy()

    features = [c for c in df.columns if c not in (site_column, label_column, split_column)]
    if not features:
        raise FedmiError(f"{path}: no feature columns besides '{site_column}' and '{label_column}'")
    for c in features:
        values = pd.to_numeric(df[c], errors="coerce")
        non_numeric = values.isna() & df[c].notna()
        if non_numeric.any():
            raise FedmiError(f"{path}: feature column '{c}' is not numeric "
                             f"('{df[c][non_numeric].iloc[0]}' at {_rows(non_numeric)})")
        missing = ~np.isfinite(values.to_numpy(dtype=float))
        if missing.any():
            raise FedmiError(f"{path}: feature column '{c}' has missing, NaN or infinite values at "
                             f"{_rows(pd.Series(missing))}")
        df[c] = values
    x = df[features].to_numpy(dtype=np.float32)

    sites = []
    site_values = df[site_column].astype(str)
    for site in dict.fromkeys(site_values):  # order of first appearance
        m = (site_values == site).to_numpy()
        site_test = None if test is None else test[m]
        if site_test is not None and not site_test.any():
            raise FedmiError(f"{path}: site '{site}' has no 'test' rows in split column '{split_column}'")
        sites.append(Site(site, x[m], y[m], site_test))
    return Federation(
        name=name or f"csv:{path.name}",
        sites=sites,
        kind="tabular",
        feature_names=[str(c) for c in features],
        description=f"{path.name}: {len(df)} subjects, {len(features)} features, {len(sites)} sites",
        label_names=("0", "1") if positive_label is None else (f"not {positive_label}", positive_label),
    )


class CsvOptions(DatasetOptions):
    path: str = Field(description="the CSV file")
    site_column: str = Field("site", description="CSV: column naming each row's site")
    label_column: str = Field("label", description="CSV: column holding the label")
    split_column: str | None = Field(None, description="CSV: column holding train/test (a fixed split)")
    positive_label: str | None = Field(None, description=POSITIVE_LABEL_HELP)


@DATASETS.register()
class CsvFeatures(Dataset):
    """Your own table: `csv:PATH`, one row per subject."""

    name = "csv"
    Options = CsvOptions
    path_prefix = True

    def load(self, options: CsvOptions, seed: int) -> Federation:
        return load_csv(options.path, options.site_column, options.label_column, options.split_column,
                        options.positive_label)
