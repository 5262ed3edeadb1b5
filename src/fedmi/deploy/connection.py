"""How fedmi's commands reach a server: its address, the CA that vouches for it, and (for the
operator's commands, on the server's machine) the operator's token; the Flower CLI run with them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedmi.deploy.pins import TOKEN_FILE_ENV
from fedmi.deploy.processes import flower_env
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

DEFAULT_PORT = 9092
OPERATOR_TOKEN = "operator.token"  # in the server's state folder: the Control API's credential


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedmiError(f"server address '{address}' must be HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def existing_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise FedmiError(f"no {what} at {path}")
    return Path(path).resolve()


def operator_token_file(state_dir: Path, create: bool = False) -> Path:
    """The operator's token in the server's state folder; `create` makes it (0600) when absent."""
    path = Path(state_dir) / OPERATOR_TOKEN
    if create and not path.exists():
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    if not path.is_file():
        raise FedmiError(f"no operator token at {path}: run this on the server's machine, as its operator, "
                         "with --state as given to `fedmi server`")
    return path.resolve()


@dataclass
class Connection:
    """How a command reaches the SuperLink: its address, the CA certificate (None: --insecure), and
    the server's state folder when the command is the operator's (its token opens the Control API)."""

    address: str
    ca: Path | None
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        host, _ = split_address(self.address)
        if self.ca is None:
            if not is_loopback(host):
                raise FedmiError(f"--insecure (no TLS) is allowed only on loopback, not on {host}")
            log.warning("TLS is off (--insecure): traffic to %s is plaintext; use this only for local tests",
                        self.address)
        else:
            self.ca = existing_file(Path(self.ca), "CA certificate")
        if self.state_dir is not None:
            self.token_file = operator_token_file(self.state_dir)

    def flwr_home(self, folder: Path) -> Path:
        """A Flower CLI configuration folder whose default connection is this one."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "fedmi"', "", "[superlink.fedmi]", f'address = "{self.address}"']
        lines.append("insecure = true" if self.ca is None else f'root-certificates = "{self.ca}"')
        (folder / "config.toml").write_text("\n".join(lines) + "\n")
        return folder

    def flwr_env(self, home: Path) -> dict[str, str]:
        env = flower_env(self.flwr_home(home))
        if self.state_dir is not None:
            env[TOKEN_FILE_ENV] = str(self.token_file)
        return env

    def flwr(self, args: list[str], check: bool = True, capture: bool = True,
             tee: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
        """Flower's CLI against this server (with the operator's token when this is the operator's).
        `capture` False: its output goes to this process's; with `tee`, line by line, each line also
        given to `tee`."""
        argv = [sys.executable, "-m", "fedmi.deploy.pins", "flwr", *args]
        with tempfile.TemporaryDirectory(prefix="fedmi-flwr-") as home:
            if tee is None or capture:
                done = subprocess.run(argv, env=self.flwr_env(Path(home)), capture_output=capture, text=True)
            else:
                with subprocess.Popen(argv, env=self.flwr_env(Path(home)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1) as proc:
                    for line in proc.stdout:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                        tee(line)
                done = subprocess.CompletedProcess(argv, proc.returncode)
        if check and done.returncode != 0:
            message = " ".join(((done.stdout or "") + (done.stderr or "")).split())[-400:]
            raise FedmiError(f"flwr {' '.join(args[:2])} failed: {message}")
        return done


def json_object(text: str) -> dict:
    """The JSON object in a Flower CLI answer (which may print other lines before it), or {}."""
    try:
        found = json.loads(text[text.index("{"):])
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
