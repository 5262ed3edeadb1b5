"""The Flower processes a deployment runs, supervised: their environment (offline, fedmi's
launchers first on PATH), a foreground run that relays their output and stops their whole
process group, and children that die with their parent however it dies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from fedmi.errors import FedmiError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "PYTHONUNBUFFERED": "1",
}


def flower_program(program: str) -> str:
    """A Flower program of this environment (the one fedmi runs in), not whatever PATH finds first."""
    path = Path(sys.executable).parent / program
    if not path.exists():
        found = shutil.which(program)
        if found is None:
            raise FedmiError(f"{program} is not installed; install fedmi with its Flower dependencies")
        return found
    return str(path)


def flower_env(flwr_home: Path | None = None, launchers: Path | None = None) -> dict[str, str]:
    """This process's environment for a Flower program: offline, and with `launchers` (fedmi's
    app-process launchers, app_pin.py) found before Flower's own programs."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = os.pathsep.join([*([str(launchers)] if launchers else []), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a Flower program and everything it started (its own process group).

    SIGINT first (the SuperLink ignores SIGTERM while it serves), SIGKILL for what remains.
    """
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def die_with_parent() -> None:
    """In a child, before exec: Linux sends it SIGKILL when its parent dies, however the parent
    dies, so a killed `fedmi server` or `fedmi site` leaves no process behind (nor a secret in one)."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Flower starts some processes without waiting for them; an ignored SIGCHLD, inherited through
    # exec, has the kernel reap them so that none is left defunct.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour and cursor codes


def plain_flower_logs() -> None:
    """Flower's own log lines in this process (its HTTP clients' retries, say) without colour codes
    when the output is a file or a pipe, as the relayed lines of its programs are."""
    if not sys.stdout.isatty():
        from flwr.supercore.logger import update_console_handler

        update_console_handler(colored=False)


def start_child(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """A supervised child: its own process group, killed with this process, output as text lines."""
    return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            preexec_fn=die_with_parent, **kwargs)


def relay_output(proc: subprocess.Popen, watch: Callable[[str], str | None] | None = None,
                 prefix: str = "") -> threading.Thread:
    """Pass a child's output to this process's stdout, line by line, in a thread; `watch(line)` may
    return a line of fedmi's own to print after it (a refused site, say)."""
    plain = not sys.stdout.isatty()  # a log file or a pipe: colour codes would be noise there

    def relay() -> None:
        for line in proc.stdout:
            sys.stdout.write(prefix + (_ANSI.sub("", line) if plain else line))
            note = watch(line) if watch is not None else None
            if note:
                sys.stdout.write(f"fedmi: {note}\n")
            sys.stdout.flush()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return thread


def run_foreground(argv: list[str], env: dict[str, str], on_start: Callable[[subprocess.Popen], None] | None = None,
                   watch: Callable[[str], str | None] | None = None,
                   alive: Callable[[], bool] | None = None) -> int:
    """Run a Flower program until it ends, `alive()` turns false, or this process is interrupted
    (Ctrl-C, SIGTERM); its exit status. Its output is relayed (`relay_output`)."""
    proc = start_child(argv, env)
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stopping.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    relay = relay_output(proc, watch)
    try:
        if on_start is not None:
            on_start(proc)
        while proc.poll() is None and not stopping and (alive is None or alive()):
            time.sleep(0.2)
        return proc.returncode if proc.returncode is not None else 0
    finally:
        stop_process_group(proc)
        relay.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until `host:port` accepts connections; an error if `proc` stops first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedmiError(f"the server stopped while starting (exit status {proc.returncode}); see its log above")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FedmiError(f"the server did not open {host}:{port} within {timeout:g} s")
