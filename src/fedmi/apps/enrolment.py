"""Which sites the server's operator enrolled, by Flower node id and name, and when each last answered.

Flower knows a site by a node id; the server keeps the names it enrolled them under in its
state folder, for `fedmi status`, and fedmi's ServerApp admits only those nodes, each under the
name it was enrolled with: a site is who its key is, whatever its replies say. The ServerApp
notes each site's latest reply (time, run, round, task) in the same folder (`record_contact`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SITE_NAMES = "site-names.json"  # in the server's state folder: node id -> site name
SITE_KEYS = "site-keys.json"  # in the server's state folder: site name -> its enrolled public key (OpenSSH text)
ENROLLED_SITES_ENV = "FEDMI_ENROLLED_SITES"  # set by `fedmi server` for its ServerApp: that file's path
OPERATOR_KEY_ENV = "FEDMI_OPERATOR_KEY"  # set by `fedmi server`: operator.pub, the run tickets' signer
RUNS_ROOT_ENV = "FEDMI_RUNS_ROOT"  # set by `fedmi server`: runs write their outputs only below this folder
SITE_ACTIVITY = "site-activity.json"  # in the server's state folder: site name -> its latest reply
ACTIVITY_ENV = "FEDMI_SITE_ACTIVITY"  # set by `fedmi server` for its ServerApp: that file's path


def site_names(path: Path | None) -> dict[str, str]:
    """The enrolled sites' names by node id; `path` is the file or the server's state folder."""
    if path is not None and path.is_dir():
        path = path / SITE_NAMES
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def site_keys(state_dir: Path) -> dict[str, str]:
    """The enrolled sites' public keys by name: what the server registers again at every start."""
    path = Path(state_dir) / SITE_KEYS
    return json.loads(path.read_text()) if path.is_file() else {}


def remember_site(state_dir: Path, node_id: int, name: str, key: str | None = None) -> None:
    """`name` is node `node_id` (and, when given, its public key is `key`)."""
    names = site_names(state_dir)
    names[str(node_id)] = name
    _write(state_dir, names)
    if key is not None:
        _write_json(Path(state_dir) / SITE_KEYS, {**site_keys(state_dir), name: key})


def forget_site(state_dir: Path, node_id: int) -> None:
    """Node `node_id` is gone; its site's key too, unless the site has another node (a new key)."""
    names = site_names(state_dir)
    name = names.pop(str(node_id), None)
    _write(state_dir, names)
    if name is not None and name not in names.values():
        keys = site_keys(state_dir)
        keys.pop(name, None)
        _write_json(Path(state_dir) / SITE_KEYS, keys)


def forget_nodes(state_dir: Path) -> None:
    """A new SuperLink knows no node: the names by node id are made again as keys are registered."""
    _write(state_dir, {})


def _write(state_dir: Path, names: dict[str, str]) -> None:
    _write_json(state_dir / SITE_NAMES, names)


def _write_json(path: Path, content: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


def site_activity(path: Path | None) -> dict[str, dict]:
    """Each site's latest reply to a ServerApp of this server: {"time", "run", "round", "task"}."""
    if path is not None and path.is_dir():
        path = path / SITE_ACTIVITY
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def record_contact(path: Path, site: str, run: str, task: str, server_round: int) -> None:
    """Note that `site` answered a `task` ("query", "train", "evaluate") of `run` in `server_round`."""
    activity = site_activity(path)
    activity[site] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run, "round": server_round, "task": task}
    _write_json(path, activity)
