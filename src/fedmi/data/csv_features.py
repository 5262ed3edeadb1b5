"""A generic CSV source: one row per subject, a site column, a label column, feature columns.

This is the survey's ADNI setting (90 AAL gray-matter volumes per subject, AD vs NC, site =
ADNI-1 / ADNI-2): a user with such a table runs the survey's experiment with one command,
`fedmi table2 --dataset csv:PATH`. Every column other than the site, label and split columns
is a feature and must be numeric and complete. An optional split column holding `train` or
`test` gives a fixed split instead of random repeats.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from fedmi.data.federation import Federation, Site
from fedmi.data.labels import TASK_HELP, TaskChoice, classes_of
from fedmi.data.registry import DATASETS, POSITIVE_LABEL_HELP, Dataset, DatasetOptions
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")


def _rows(mask: pd.Series) -> str:
    lines = (np.flatnonzero(mask.to_numpy()) + 2).tolist()  # +2: header is line 1
    shown = ", ".join(map(str, lines[:5]))
    return f"line{'s' if len(lines) > 1 else ''} {shown}{' ...' if len(lines) > 5 else ''}"


def _label_values(col: pd.Series, path: Path, name: str) -> pd.Series:
    """The label column as trimmed text (`fedmi.data.labels` compares numbers by value: 2.0 is class 2)."""
    values = col.map(lambda v: "" if pd.isna(v) else str(v).strip())
    empty = values == ""
    if empty.any():
        raise FedmiError(f"{path}: label column '{name}' is empty at {_rows(empty)}")
    return values


DELIMITERS = (",", ";", "\t", "|")


def decode_csv(path: Path) -> tuple[str, str]:
    """A CSV file's text and delimiter: UTF-8 (a BOM allowed), else an error saying to save it so; the
    delimiter is the header's most frequent of `DELIMITERS` (a comma where none occurs), so Excel's
    `;` files read as they are."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FedmiError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as "
                         "UTF-8 (in Excel: Save As, CSV UTF-8)") from None
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = max(DELIMITERS, key=lambda d: (first.count(d), d == ","))
    if delimiter != ",":
        log.info("%s: columns separated by %r", path, delimiter)
    return text, delimiter


def _read_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The table and its header's column names."""
    text, delimiter = decode_csv(path)
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
        df = pd.read_csv(io.StringIO(text), sep=delimiter)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as e:
        raise FedmiError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    return df, header


def load_csv(
    path: str | Path,
    site_column: str = "site",
    label_column: str = "label",
    split_column: str | None = None,
    positive_label: str | None = None,
    name: str | None = None,
    task: TaskChoice = "auto",
) -> Federation:
    """The federation of one table: a site column, a label column (two or more classes, text or
    numbers: `fedmi.data.labels`), an optional split column, every other column a numeric feature.

    Args:
      path: the CSV file (UTF-8; comma, semicolon, tab or bar separated).
      site_column, label_column, split_column: the columns of each role.
      positive_label: the class counted as positive (SEN); on more than two classes, one against the rest.
      name: the federation's name in reports (default `csv:FILE`).
      task: "auto", "binary" or "multiclass".
    Example:
      ``load_csv("grades.csv", label_column="grade")`` with grades low/mid/high is a 3-class task.
    """
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no CSV file at {path}")
    df, header = _read_table(path)
    # pandas silently renames a repeated column (label -> label.1), which would make it a feature
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise FedmiError(f"{path}: column name(s) {repeated} appear more than once in the header")
    if any(not c.strip() for c in header):
        raise FedmiError(f"{path}: column {[c.strip() for c in header].index('') + 1} of the header has no name "
                         "(an index column?); name it or remove it")
    if len(header) == 1:
        raise FedmiError(f"{path}: the header has one column ('{header[0][:60]}'); a table needs a site, a label "
                         "and features in columns separated by , ; tab or |")
    for role, col in (("site", site_column), ("label", label_column), ("split", split_column)):
        if col is not None and col not in df.columns:
            raise FedmiError(f"{path}: no {role} column '{col}' (columns: {', '.join(map(str, df.columns[:12]))}"
                             f"{' ...' if len(df.columns) > 12 else ''})")
    if df.empty:
        raise FedmiError(f"{path}: a header but no rows")
    if df[site_column].isna().any():
        raise FedmiError(f"{path}: site column '{site_column}' is empty at {_rows(df[site_column].isna())}")
    site_values = df[site_column].astype(str).str.strip()
    labels = _label_values(df[label_column], path, label_column)
    classes = classes_of({s: labels[site_values == s] for s in dict.fromkeys(site_values)}, positive_label,
                         task, where=str(path))
    y = classes.encode(labels)

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
            first = str(df[c][non_numeric].iloc[0])
            comma = " (a decimal comma? write numbers with a decimal point)" if re.fullmatch(r"-?\d+,\d+", first) else ""
            raise FedmiError(f"{path}: feature column '{c}' is not numeric ('{first}' at {_rows(non_numeric)}){comma}")
        missing = ~np.isfinite(values.to_numpy(dtype=float))
        if missing.any():
            raise FedmiError(f"{path}: feature column '{c}' has missing, NaN or infinite values at "
                             f"{_rows(pd.Series(missing))}")
        df[c] = values
    x = df[features].to_numpy(dtype=np.float32)

    sites = []
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
        label_names=classes.names,
        task=classes.task,
    )


class CsvOptions(DatasetOptions):
    path: str = Field(description="the CSV file")
    site_column: str = Field("site", description="CSV: column naming each row's site")
    label_column: str = Field("label", description="CSV: column holding the label")
    split_column: str | None = Field(None, description="CSV: column holding train/test (a fixed split)")
    positive_label: str | None = Field(None, description=POSITIVE_LABEL_HELP)
    task: TaskChoice = Field("auto", description=TASK_HELP)


@DATASETS.register()
class CsvFeatures(Dataset):
    """Your own table: `csv:PATH`, one row per subject."""

    name = "csv"
    Options = CsvOptions
    path_prefix = True

    def load(self, options: CsvOptions, seed: int) -> Federation:
        return load_csv(options.path, options.site_column, options.label_column, options.split_column,
                        options.positive_label, task=options.task)
