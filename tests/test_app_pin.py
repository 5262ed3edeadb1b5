"""Sites and the server run only fedmi's own app bundle: a bundle that carries code, or names
other apps, is refused before Flower installs it."""

from __future__ import annotations

import pytest
from flwr.cli.build import build_fab_from_files

from fedmi.deploy.app_pin import APP_COMPONENTS, check_app_bundle, launch, write_launchers
from fedmi.deploy.runs import APP_PYPROJECT
from fedmi.errors import FedmiError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Flower's bundle builder uses old pathspec


def _bundle(pyproject: str, **files: str) -> bytes:
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), **{k: v.encode() for k, v in files.items()}})[0]


FEDMI = APP_PYPROJECT.format(**APP_COMPONENTS)


def test_fedmis_own_bundle_is_accepted():
    check_app_bundle(_bundle(FEDMI))


def test_a_bundle_with_code_of_its_own_is_refused():
    evil = FEDMI.replace(APP_COMPONENTS["clientapp"], "evil:app")
    with pytest.raises(FedmiError, match="carries files of its own.*evil.py"):
        check_app_bundle(_bundle(evil, **{"evil.py": "import os\napp = os.system('touch /tmp/owned')\n"}))


def test_a_bundle_naming_other_installed_apps_is_refused():
    # No files of its own, but it points at something else already installed.
    other = FEDMI.replace(APP_COMPONENTS["clientapp"], "flwr.clientapp:ClientApp")
    with pytest.raises(FedmiError, match="not fedmi's"):
        check_app_bundle(_bundle(other))


def test_an_unreadable_bundle_is_refused():
    with pytest.raises(FedmiError, match="cannot be read"):
        check_app_bundle(b"not a zip")


def test_launchers_shadow_flowers_app_programs_and_refuse_other_app_kinds(tmp_path, capsys):
    folder = write_launchers(tmp_path / "bin")
    assert {p.name for p in folder.iterdir()} >= {"flwr-clientapp", "flwr-serverapp", "flwr-simulation"}
    assert "launch('flwr-clientapp')" in (folder / "flwr-clientapp").read_text()
    assert launch("flwr-agentapp") == 2
    assert "refused to start flwr-agentapp" in capsys.readouterr().err
