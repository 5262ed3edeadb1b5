"""Which sites the server's operator enrolled, by Flower node id and name.

Flower knows a site by a node id; the server keeps the names it enrolled them under in its
state folder, for `fedmi status`, and fedmi's ServerApp admits only those nodes, each under the
name it was enrolled with: a site is who its key is, whatever its replies say.
"""

from __future__ import annotations

import json
from pathlib import Path

SITE_NAMES = "site-names.json"  # in the server's state folder: node id -> site name
ENROLLED_SITES_ENV = "FEDMI_ENROLLED_SITES"  # set by `fedmi server` for its ServerApp: that file's path
OPERATOR_KEY_ENV = "FEDMI_OPERATOR_KEY"  # set by `fedmi server`: operator.pub, the run tickets' signer
RUNS_ROOT_ENV = "FEDMI_RUNS_ROOT"  # set by `fedmi server`: runs write their outputs only below this folder


def site_names(path: Path | None) -> dict[str, str]:
    """The enrolled sites' names by node id; `path` is the file or the server's state folder."""
    if path is not None and path.is_dir():
        path = path / SITE_NAMES
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def remember_site(state_dir: Path, node_id: int, name: str) -> None:
    names = site_names(state_dir)
    names[str(node_id)] = name
    _write(state_dir, names)


def forget_site(state_dir: Path, node_id: int) -> None:
    names = site_names(state_dir)
    names.pop(str(node_id), None)
    _write(state_dir, names)


def _write(state_dir: Path, names: dict[str, str]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (SITE_NAMES + ".tmp")
    tmp.write_text(json.dumps(names, indent=1))
    tmp.replace(state_dir / SITE_NAMES)
