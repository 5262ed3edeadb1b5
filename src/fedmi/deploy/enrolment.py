"""Enrolment: which sites' keys the server admits, under which names (the operator's commands).

A site's identity is the key it was enrolled with: the server keeps node id -> name in its state
folder (`apps.enrolment`), and fedmi's ServerApp knows each site by that name, never by what the
site says. So a name is enrolled under one key only, and a key under one name (Flower refuses a
key registered twice). `enroll` reads Flower's answer and fails when the key was not registered;
`revoke` unregisters a site; `enroll(..., replace=NAME)` rotates a site's key.

The server keeps each enrolled site's public key too (`site-keys.json`): its SuperLink holds its
state in memory (Flower's SQL state cost most of a round), so `restore` registers every key again
when the server starts, and the sites' names get their new node ids.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fedmi.apps.enrolment import forget_nodes, forget_site, remember_site, site_keys, site_names
from fedmi.deploy.certs import check_site_name
from fedmi.deploy.connection import Connection, existing_file, json_object
from fedmi.deploy.processes import say
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")


def site_name_of_key(key: Path) -> str:
    """The name `fedmi certs` wrote as the key's comment (else the file's stem)."""
    parts = key.read_text().split()
    return parts[2] if len(parts) >= 3 else key.stem


def _node_of(names: dict[str, str], name: str) -> int | None:
    return next((int(n) for n, s in names.items() if s == name), None)


def enroll(connection: Connection, key: Path, name: str | None = None, state_dir: Path | None = None,
           replace: bool = False) -> int:
    """Register a site's public key under `name` (default: the key's comment); its node id.

    `replace`: the site `name` is enrolled already and this is its new key; the old key is
    unregistered once the new one is in (key rotation). Without it, a name already enrolled is refused."""
    key = existing_file(Path(key), "site public key")
    name = check_site_name(name or site_name_of_key(key))
    state_dir = state_dir or connection.state_dir
    if state_dir is None:
        raise FedmiError("enrolment needs the server's state folder (--state)")
    names = site_names(state_dir)
    old = _node_of(names, name)
    if old is not None and not replace:
        raise FedmiError(f"site {name} is enrolled already (node {old}); to give it a new key: "
                         f"fedmi enroll {key} --replace --name {name}")
    if old is None and replace:
        raise FedmiError(f"--replace: no site named {name} is enrolled (enrolled: {', '.join(sorted(names.values())) or 'none'})")
    node_id = _register(connection, key, name)
    remember_site(state_dir, node_id, name, key.read_text().strip())
    if old is not None:
        _unregister(connection, old)
        forget_site(state_dir, old)
        say(f"site {name}: new key {key.name} enrolled (node {node_id}); its old key (node {old}) is revoked")
    else:
        say(f"enrolled site {name} ({key.name}, node {node_id})")
    return node_id


def _register(connection: Connection, key: Path, name: str) -> int:
    """Flower's node id for `key`, registered now; an error with Flower's reason if it was not."""
    done = connection.flwr(["supernode", "register", str(key), "--name", name, "--format", "json"], check=False)
    answer = json_object(done.stdout)
    node_id = answer.get("node-id")
    if done.returncode != 0 or not answer.get("success", True) or node_id is None:
        said = answer.get("error-message") or " ".join((done.stdout + done.stderr).split())[-300:]
        raise FedmiError(f"could not enrol site {name} ({key.name}): {said}")
    return int(node_id)


def restore(connection: Connection, state_dir: Path) -> list[str]:
    """Register every enrolled site's key with a SuperLink that has just started (it knows none);
    the names restored."""
    keys = site_keys(state_dir)
    if site_names(state_dir) and not keys:
        say(f"fedmi: WARNING: {state_dir} names enrolled sites but holds none of their keys (enrolled with an "
            "earlier fedmi): enrol them again (fedmi server --enroll SITE.pub, or fedmi enroll)", "warning")
    forget_nodes(state_dir)
    with tempfile.TemporaryDirectory(prefix="fedmi-keys-") as folder:
        for name, text in sorted(keys.items()):
            path = Path(folder) / f"{name}.pub"
            path.write_text(text + "\n")
            remember_site(state_dir, _register(connection, path, name), name)
    if keys:
        say(f"sites enrolled: {', '.join(sorted(keys))}")
    return sorted(keys)


def _unregister(connection: Connection, node_id: int) -> None:
    done = connection.flwr(["supernode", "unregister", str(node_id), "--format", "json"], check=False)
    answer = json_object(done.stdout)
    if done.returncode != 0 or not answer.get("success", True):
        said = answer.get("error-message") or " ".join((done.stdout + done.stderr).split())[-300:]
        raise FedmiError(f"could not unregister node {node_id}: {said}")


def revoke(connection: Connection, name: str, state_dir: Path | None = None) -> None:
    """Unregister the site enrolled as `name`: its key is refused from now on."""
    state_dir = state_dir or connection.state_dir
    names = site_names(state_dir)
    node_id = _node_of(names, name)
    if node_id is None:
        raise FedmiError(f"no site named {name} is enrolled (enrolled: {', '.join(sorted(names.values())) or 'none'})")
    _unregister(connection, node_id)
    forget_site(state_dir, node_id)
    say(f"revoked site {name} (node {node_id})")
