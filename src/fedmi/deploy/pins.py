"""Flower's own programs, started with the few changes fedmi's deployment makes to them.

`python -m fedmi.deploy.pins PROGRAM ARGS...` runs Flower's PROGRAM with ARGS after:

- `superlink`: the operator gate (`gate.OperatorGate`) in front of the SuperLink's HTTP app;
  the operator's token comes from the file named by FEDMI_OPERATOR_TOKEN_FILE;
- `supernode`: the SuperNode's fixed waits shortened. Idle, Flower 1.42 sleeps 3 s between two
  looks for work at the SuperLink and 0.5 s between two looks for its app's reply; a round then
  costs seconds of waiting. FEDMI_SITE_POLL sets the first (default 0.2 s), the second is 0.02 s
  (a look at the site's own memory);
  Its heartbeat comes every 10 s (Flower's shortest; its default 30 s), so a site that crashed
  is counted offline 20 s after its last heartbeat rather than 60 s; and a site restarted
  within that window, which Flower refuses to activate while its earlier connection still
  counts as online, waits it out (`wait_out_stale_connection`) instead of exiting (a site never
  connected to this server before is refused at once: its key is not enrolled);
- every Flower process fedmi starts or runs tasks in: the first wait for a message part that is
  not there yet. Flower 1.42 waits 1 s, then 2 s, ... (`pull_objects`); a reply's parts arrive
  milliseconds after its notice, so a round paid one to three such seconds. fedmi waits 0.02 s,
  doubling up to 0.2 s;
- `flwr`: Flower's CLI, with every Control API request carrying the operator's token (from the
  file FEDMI_OPERATOR_TOKEN_FILE names; none when unset).

Each change reaches into Flower at one named place, so the Flower version is checked first: a
different one stops with an error rather than running unfiltered.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FLOWER_VERSION = "1.42.0"
TOKEN_FILE_ENV = "FEDMI_OPERATOR_TOKEN_FILE"
SITE_POLL_ENV = "FEDMI_SITE_POLL"
DEFAULT_SITE_POLL = 0.2
REPLY_POLL = 0.02
FIRST_PULL_RETRY, PULL_RETRY_CAP = 0.02, 0.2
SITE_HEARTBEAT = 10.0  # seconds; Flower's HEARTBEAT_MIN_INTERVAL
ACTIVATION_WAIT_ENV = "FEDMI_ACTIVATION_WAIT"  # seconds a refused activation is asked again (default: the window)


def check_flower_version() -> None:
    import flwr

    found = flwr.__version__
    if found != FLOWER_VERSION:
        raise SystemExit(f"fedmi: Flower {found} is installed; fedmi's deployment is built for Flower "
                         f"{FLOWER_VERSION} (pip install flwr=={FLOWER_VERSION})")


class ShortWaits:
    """Stands in for the `time` module of Flower's SuperNode loop: its 3 s idle wait becomes `idle`,
    its 0.5 s wait for a reply becomes `reply`; everything else is `time`'s own."""

    def __init__(self, idle: float, reply: float = REPLY_POLL):
        self.waits = {3: idle, 0.5: reply}

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def set_default(function, parameter: str, value) -> None:
    """Change the default of `function`'s `parameter` (positional-or-keyword or keyword-only)."""
    import inspect

    params = list(inspect.signature(function).parameters.values())
    if function.__kwdefaults__ and parameter in function.__kwdefaults__:
        function.__kwdefaults__[parameter] = value
        return
    with_defaults = [p.name for p in params if p.default is not inspect.Parameter.empty
                     and p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if parameter not in with_defaults:
        raise SystemExit(f"fedmi: {function.__qualname__} has no default for {parameter}: not Flower {FLOWER_VERSION}")
    defaults = list(function.__defaults__)
    defaults[with_defaults.index(parameter)] = value
    function.__defaults__ = tuple(defaults)


def shorten_object_waits() -> None:
    """The first wait for a message part not there yet: 0.02 s instead of Flower's 1 s (above)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        set_default(function, "initial_backoff", FIRST_PULL_RETRY)
        set_default(function, "backoff_cap", PULL_RETRY_CAP)


def _superlink() -> None:
    from fedmi.deploy.gate import OperatorGate, read_secret
    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli.flower_superlink import flower_superlink

    token = read_secret(Path(os.environ[TOKEN_FILE_ENV]), "operator token")
    create_app = superlink_main.create_app

    def gated_app(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_middleware(OperatorGate, operator_token=token)  # outermost: before any of Flower's
        return app

    superlink_main.create_app = gated_app  # the name flower_superlink looks up when it serves
    flower_superlink()


def wait_out_stale_connection(activate, window: float, pause: float = 1.0, clock=time.monotonic, sleep=time.sleep):
    """`FleetHttpClient.ActivateNode`, asked again for up to `window` seconds while the SuperLink
    refuses it (HTTP 412): a restarted site's earlier connection still counts as online there.
    A key that is not enrolled is refused the same way, and so still fails once `window` is over."""
    import httpx

    def activate_when_free(self, request):
        deadline, told = clock() + window, False
        while True:
            try:
                return activate(self, request)
            except httpx.HTTPStatusError as e:
                if e.response.status_code != httpx.codes.PRECONDITION_FAILED or clock() >= deadline:
                    raise
                if not told:
                    print(f"fedmi: the server does not activate this site yet (an earlier connection of its key may "
                          f"still count as online there); asking again for up to {window:g} s", file=sys.stderr,
                          flush=True)
                    told = True
                sleep(pause)

    return activate_when_free


def _supernode() -> None:
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as loop
    from flwr.common.constant import HEARTBEAT_PATIENCE
    from flwr.supernode.cli.flower_supernode import flower_supernode
    from flwr.supernode.fleet_http_client import FleetHttpClient

    loop.time = ShortWaits(float(os.environ.get(SITE_POLL_ENV, DEFAULT_SITE_POLL)))
    connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat.HEARTBEAT_DEFAULT_INTERVAL = SITE_HEARTBEAT
    window = float(os.environ.get(ACTIVATION_WAIT_ENV, HEARTBEAT_PATIENCE * SITE_HEARTBEAT + 5))
    FleetHttpClient.ActivateNode = wait_out_stale_connection(FleetHttpClient.ActivateNode, window)
    shorten_object_waits()
    flower_supernode()


class OperatorHeader:
    """A Flower HTTP client interceptor adding the operator's token to every request."""

    def __init__(self, token: bytes):
        self.token = token.decode()

    def intercept(self, context, call_next):
        from fedmi.deploy.gate import OPERATOR_HEADER

        context.request.headers[OPERATOR_HEADER] = self.token
        return call_next(context)


def _flwr() -> None:
    from fedmi.deploy.gate import read_secret
    from flwr.cli.app import app
    from flwr.supercore.control.control_http_client import ControlHttpClient

    if os.environ.get(TOKEN_FILE_ENV):
        header = OperatorHeader(read_secret(Path(os.environ[TOKEN_FILE_ENV]), "operator token"))
        init = ControlHttpClient.__init__

        def with_token(self, *args, interceptors=(), **kwargs):
            init(self, *args, interceptors=(*interceptors, header), **kwargs)

        ControlHttpClient.__init__ = with_token
    app(prog_name="flwr")


PROGRAMS = {"superlink": _superlink, "supernode": _supernode, "flwr": _flwr}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in PROGRAMS:
        raise SystemExit(f"usage: python -m fedmi.deploy.pins {{{','.join(PROGRAMS)}}} ARGS...")
    check_flower_version()
    shorten_object_waits()
    program = argv[1]
    sys.argv = [f"fedmi-{program}", *argv[2:]]
    PROGRAMS[program]()


if __name__ == "__main__":
    main(sys.argv)
