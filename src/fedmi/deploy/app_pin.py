"""The server and the sites run only fedmi's own apps, never code that arrives over the network.

A Flower run ships an app bundle (FAB: a zip of the app's pyproject.toml and source files) that
every SuperNode installs and imports. Flower 1.42's Control API, on the same port as the sites'
connections, does not authenticate who starts a run (account authentication is not in the open
source release), so anyone who can reach the server could start a run whose bundle carries its
own ClientApp: code executed at every hospital, next to its patient data. fedmi's bundle holds
no code, only pyproject.toml naming fedmi's installed apps. So `fedmi server` and `fedmi site`
start Flower with their own launchers for the app processes: the ServerApp and ClientApp
launchers check each bundle before Flower installs it and refuse any other, and the launchers
of the other app kinds (agents, models, connectors, simulations) refuse outright.
"""

from __future__ import annotations

import io
import logging
import sys
import tomllib
import zipfile
from pathlib import Path

from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

APP_COMPONENTS = {"serverapp": "fedmi.apps.server:app", "clientapp": "fedmi.apps.site:app"}
# Flower's own app-process programs, which its SuperExec starts by name from PATH.
PINNED = {"flwr-clientapp": ("flwr.supernode.runtime.run_clientapp", "flwr.supernode.cli", "flwr_clientapp"),
          "flwr-serverapp": ("flwr.superlink.runtime.run_serverapp", "flwr.superlink.cli", "flwr_serverapp")}
REFUSED = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-simulation")


def check_app_bundle(content: bytes) -> None:
    """Accept only fedmi's bundle: a pyproject.toml naming fedmi's apps, and no files of code."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = bundle.namelist()
            others = sorted(n for n in names if n != "pyproject.toml" and not n.startswith(".info/"))
            project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedmiError(f"refused an app bundle that cannot be read ({e})") from None
    if others:
        raise FedmiError(f"refused an app bundle that carries files of its own ({', '.join(others[:5])}): "
                         "this machine runs only fedmi's installed apps")
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if components != APP_COMPONENTS:
        raise FedmiError(f"refused an app bundle whose apps are {components}, not fedmi's: "
                         "this machine runs only fedmi's installed apps")


def write_launchers(folder: Path) -> Path:
    """Launchers named as Flower's app programs, for the front of the SuperLink's or SuperNode's PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for program in (*PINNED, *REFUSED):
        path = folder / program
        path.write_text(f"#!{sys.executable}\nimport sys\nfrom fedmi.deploy.app_pin import launch\n"
                        f"sys.exit(launch({program!r}))\n")
        path.chmod(0o755)
    return folder


def _take_token_file() -> None:
    """A task token handed over in a private file is read and the file removed at once; Flower then
    gets it in this process's own argument list, which `ps` does not show (it shows the file's name)."""
    if "--token-file" not in sys.argv[:-1]:
        return
    at = sys.argv.index("--token-file")
    path = Path(sys.argv[at + 1])
    token = path.read_text().strip()
    path.unlink()
    sys.argv[at:at + 2] = ["--token", token]


def launch(program: str) -> int:
    """Run Flower's `program` with every app bundle checked before it is installed."""
    if program not in PINNED:
        print(f"fedmi: refused to start {program}: this machine runs only fedmi's ServerApp and ClientApp",
              file=sys.stderr)
        return 2
    import importlib

    runtime_module, cli_module, entry = PINNED[program]
    runtime = importlib.import_module(runtime_module)
    install = runtime.install_from_fab

    def install_checked(content: bytes, *args, **kwargs):
        try:
            check_app_bundle(content)
        except FedmiError as e:
            print(f"fedmi: {e}", file=sys.stderr, flush=True)
            raise
        return install(content, *args, **kwargs)

    runtime.install_from_fab = install_checked  # the name the runtime calls: Flower pinned at 1.42.0
    from fedmi.deploy.pins import check_flower_version, shorten_object_waits

    check_flower_version()
    shorten_object_waits()
    _take_token_file()
    getattr(importlib.import_module(cli_module), entry)()
    return 0
