"""Output folders that never lose a run.

A command writes a run into a folder in one of three modes:

- "new" (the default): the folder must not hold anything yet. A run that fails before its first
  round completes removes the folder it created; one that fails or is interrupted later keeps
  its completed rounds there, ready for ``--resume``.
- "overwrite": the folder may hold an earlier fedmi run. The new run is written beside it, in
  ``NAME.partial``, and replaces the earlier one only when it has finished: a run that fails
  leaves the earlier folder exactly as it was.
- "resume": the folder holds an interrupted run; the command continues it in place.

A folder that holds files but no fedmi run (a home folder given as ``--out`` by mistake) is
never replaced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from fedmi.core.server_state import NotResumable
from fedmi.errors import FedmiError

CHECKPOINT = "checkpoint.safetensors"  # the server's resumable state, rewritten after every round
RUN_CONFIG = "config.yaml"  # the run's settings, kept in its folder for --resume
TABLE2_SETTINGS = "table2.json"  # a protocol's settings, likewise
UNITS = "units.jsonl"  # a protocol's finished units of work (a setting in a repeat), one per line
ROBUSTNESS = "robustness.json"  # the corrupted-site protocol's results
PRIVACY = "privacy.json"  # the privacy-utility protocol's results
AUDIT = "audit.json"  # the leakage audit's results
RUN_MARKERS = (RUN_CONFIG, CHECKPOINT, TABLE2_SETTINGS, UNITS, "metrics.jsonl", "summary.json", "results.json",
               ROBUSTNESS, PRIVACY, AUDIT)

Mode = Literal["new", "overwrite", "resume"]


class RunInterrupted(FedmiError):
    """The user stopped the run (Ctrl-C); the message says where its completed rounds are kept."""


def holds_run(folder: Path) -> bool:
    """True if `folder` holds a fedmi run (or a part of one)."""
    return any((folder / name).exists() for name in RUN_MARKERS)


def _occupied(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def check_output(target: Path, mode: Mode, resume_flag: str = "--resume", settings: str = RUN_CONFIG) -> None:
    """Raise a FedmiError if `target` cannot take a run in `mode`; writes nothing.

    Args:
      target: the run's folder.
      mode: "new", "overwrite" or "resume".
      resume_flag: how the command spells its resume option (for the message).
      settings: the file a resumable run keeps its settings in.
    """
    if target.exists() and not target.is_dir():
        raise FedmiError(f"output folder {target} is a file")
    if mode == "resume":
        if not (target / settings).is_file():
            raise FedmiError(f"{target} holds no run to resume (no {settings})")
        return
    if not _occupied(target):
        return
    if not holds_run(target):
        raise FedmiError(f"output folder {target} holds other files, not a fedmi run; choose an empty or new folder")
    if mode == "new":
        raise FedmiError(f"{target} already holds a run; give --overwrite to replace it when the new run "
                         f"finishes, {resume_flag} to continue it, or another output folder")
    partial = _partial(target)
    if _occupied(partial):
        raise FedmiError(f"{partial} holds an interrupted run that was to replace {target}; continue it with "
                         f"{resume_flag} {partial}, or remove it")


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


@contextmanager
def output_folder(target: Path, mode: Mode = "new", resume_command: str = "--resume {}",
                  settings: str = RUN_CONFIG, progress: str = CHECKPOINT) -> Iterator[Path]:
    """The folder to write a run into, per `mode` (see the module's docstring).

    Args:
      target: where the finished run belongs.
      mode: "new", "overwrite" or "resume".
      resume_command: the command that continues a run, with {} for its folder (for messages).
      settings: the file the run keeps its settings in (what `--resume` needs).
      progress: the file whose presence means completed work worth keeping.
    Yields:
      The folder to write into: `target`, or its ``.partial`` sibling when overwriting.
    Raises:
      RunInterrupted on Ctrl-C, and the run's own error otherwise, each with a note of where
      completed rounds are kept.

    Example::

        with output_folder(Path("runs/a"), "overwrite") as folder:
            train(folder)   # runs/a is replaced only if this returns
    """
    check_output(target, mode, resume_command.replace(" {}", ""), settings)
    if mode == "resume":
        folder, created = target, False
    else:
        folder = _partial(target) if _occupied(target) else target
        created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except (Exception, KeyboardInterrupt) as e:
        kept = (folder / progress).is_file() and not isinstance(e, NotResumable)
        if not kept and created:
            shutil.rmtree(folder, ignore_errors=True)  # nothing worth keeping: leave no trace
        note = ""
        if kept:
            note = f"; the completed rounds are kept in {folder}: continue with {resume_command.format(folder)}"
            if folder != target:
                note += f" ({target} is unchanged)"
        elif folder != target:
            note = f"; {target} is unchanged"
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted("interrupted" + note) from None
        if isinstance(e, FedmiError) and note:
            raise FedmiError(f"{e}{note}") from None
        raise
    if folder != target:  # the new run is complete: it replaces the earlier one
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(folder, target)
        shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], None], overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Write one file whole or not at all: `write(tmp)` fills a temporary file beside `path`, which
    then replaces it in one step. An existing `path` is refused unless `overwrite`.

    Args:
      path: the file to make.
      write: fills the file it is given.
      overwrite: whether an existing `path` may be replaced.
      flag: how the command spells its overwrite option (for the message).

    Example::

        write_file(Path("sites.csv"), lambda tmp: frame.to_csv(tmp, index=False))
    """
    if path.is_dir():
        raise FedmiError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise FedmiError(f"{path} exists; give {flag} to replace it, or another file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite(obj):
    """JSON has no NaN or Infinity: they are written as the strings "NaN", "Infinity" and
    "-Infinity" (null stays reserved for a metric that is undefined)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
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


def write_protocol_files(out: Path, results_name: str, results: dict, table: str, plot_name: str,
                         plot: Callable[[Path], None]) -> list[Path]:
    """A protocol's three files in `out`: its results as JSON, its Markdown table and its plot.

    Args:
      out: the protocol's folder (made if missing).
      results_name: the results file's name (`PRIVACY`, `AUDIT`, `ROBUSTNESS`).
      results: the results, JSON-serialisable.
      table: the table's Markdown.
      plot_name: the plot's file name; plot: draws it to the path it is given.
    Returns:
      The three paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = [out / results_name, out / "table.md", out / plot_name]
    files[0].write_text(json.dumps(results, indent=2, default=float) + "\n")
    files[1].write_text(table)
    plot(files[2])
    return files
