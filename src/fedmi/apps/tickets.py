"""Run tickets: the operator's signature on what a run may ask of the sites.

`fedmi submit`, on the server's machine, signs the run's whole configuration with the operator's
Ed25519 key (`operator.key`, made by `fedmi certs`, never leaving that machine) into a ticket:

    ticket = canonical JSON {"config", "run_dir", "resume", "overwrite", "nonce", "issued"}
    signature = Ed25519_sign(operator.key, ticket)

The ServerApp runs only a ticket that verifies, and sends it with every message; a site verifies
it with `operator.pub` (sent to it with ca.pem) and checks that each message asks exactly what
the signed configuration says (its trainer with every option, model, seed, split, round within
the rounds). A forged or hijacked ServerApp can then make no site train on anything the operator
did not sign, and a site runs one ticket in one Flower run only (`bind`), so a ticket replayed
into another run is refused.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmi.errors import FedmiError

TICKET, SIGNATURE = "fedmi-ticket", "fedmi-signature"  # keys in the run config and in each message's task


@dataclass(frozen=True)
class Ticket:
    """A verified ticket's contents."""

    config: dict
    run_dir: str
    resume: bool
    overwrite: bool
    nonce: str
    issued: float


def sign(key_path: Path, config: dict, run_dir: str, resume: bool, overwrite: bool) -> tuple[str, str]:
    """(ticket, signature) for a run, signed with the operator's private key at `key_path`."""
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    except (OSError, ValueError) as e:
        raise FedmiError(f"cannot read the operator's signing key at {key_path} ({e}): run `fedmi submit` on the "
                         "server's machine with --certs as given to `fedmi server`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedmiError(f"{key_path} is not an Ed25519 private key")
    ticket = json.dumps({"config": config, "run_dir": run_dir, "resume": resume, "overwrite": overwrite,
                         "nonce": secrets.token_hex(16), "issued": time.time()}, sort_keys=True,
                        separators=(",", ":"))
    return ticket, base64.b64encode(key.sign(ticket.encode())).decode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise FedmiError(f"cannot read the operator's public key at {path} ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedmiError(f"{path} is not an Ed25519 public key")
    return key


def verify(public_key: Ed25519PublicKey, ticket: object, signature: object) -> Ticket:
    """The ticket's contents if the operator signed it; a FedmiError ("refused: ...") otherwise."""
    if not isinstance(ticket, str) or not isinstance(signature, str):
        raise FedmiError("refused: the task carries no run ticket signed by the server's operator")
    try:
        public_key.verify(base64.b64decode(signature, validate=True), ticket.encode())
        raw = json.loads(ticket)
        return Ticket(raw["config"], str(raw["run_dir"]), bool(raw["resume"]), bool(raw["overwrite"]),
                      str(raw["nonce"]), float(raw["issued"]))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        raise FedmiError("refused: the run ticket's signature does not verify with the operator's key") from None


def bind(folder: Path, ticket: Ticket, run_id: int) -> None:
    """Remember that `ticket` belongs to Flower run `run_id` (in `folder`); refuse it in any other run."""
    path = Path(folder) / "tickets.json"
    seen = json.loads(path.read_text()) if path.is_file() else {}
    bound = seen.get(ticket.nonce)
    if bound is not None and int(bound) != int(run_id):
        raise FedmiError(f"refused: this run ticket was signed for run {bound}, and is replayed in run {run_id}")
    if bound is None:
        seen[ticket.nonce] = int(run_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen))
        tmp.replace(path)
