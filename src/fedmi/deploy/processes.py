"""The Flower processes a deployment runs, supervised: their environment (offline, fedmi's
launchers first on PATH), a foreground run that relays their output and stops their whole
process group, and children that die with their parent however it dies.

What `fedmi server` and `fedmi site` write (their own lines, `say`, and their children's,
`relay_output`) is plain text, or with `set_log_format("json")` one JSON object a line:
{"time", "level", "source", "message"}, for a log collector.
"""

from __future__ import annotations

import json
import logging
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


def without_colours(line: str) -> str:
    """A line of a Flower program's output without its terminal colour and cursor codes."""
    return _ANSI.sub("", line)

_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")  # Flower's "INFO :", fedmi's "fedmi INFO:"
LOG_FORMATS = ("text", "json")
_log_format = "text"


def set_log_format(log_format: str) -> None:
    """"text" (the default) or "json": how this process writes its own and its children's lines."""
    global _log_format
    if log_format not in LOG_FORMATS:
        raise FedmiError(f"--log-format {log_format}: choose one of {', '.join(LOG_FORMATS)}")
    _log_format = log_format


def json_line(message: str, source: str, level: str | None = None) -> str:
    """One log line as JSON: its level read from the line when not given (Flower's and fedmi's prefixes)."""
    if level is None:
        found = _LEVEL.search(message[:40])
        level = found.group(1) if found else "INFO"
    return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": level.upper(), "source": source,
                       "message": message.strip()})


def say(message: str, level: str = "info") -> None:
    """A line of fedmi's own on standard output, in the process's log format."""
    sys.stdout.write((json_line(message, "fedmi", level) if _log_format == "json" else message) + "\n")
    sys.stdout.flush()


class JsonLogFormatter(logging.Formatter):
    """fedmi's log records in the JSON line format of `json_line`."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line(record.getMessage(), record.name, record.levelname)


def plain_flower_logs() -> None:
    """Flower's own log lines in this process (its HTTP clients' retries, say) as the relayed lines
    of its programs are: without colour codes when the output is a file or a pipe, and as JSON
    lines in the JSON log format."""
    if _log_format == "json":
        flower = logging.getLogger("flwr")
        for handler in list(flower.handlers):
            flower.removeHandler(handler)
        handler = logging.StreamHandler(sys.stdout)
        handler.setLevel(logging.INFO)
        handler.setFormatter(JsonLogFormatter())
        flower.addHandler(handler)
    elif not sys.stdout.isatty():
        from flwr.supercore.logger import update_console_handler

        update_console_handler(colored=False)


def start_child(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """A supervised child: its own process group, killed with this process, output as text lines."""
    return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            preexec_fn=die_with_parent, **kwargs)


def relay_output(proc: subprocess.Popen, watch: Callable[[str], str | None] | None = None,
                 source: str = "flower") -> threading.Thread:
    """Pass a child's output to this process's stdout, line by line, in a thread; `watch(line)` may
    return a line of fedmi's own to print after it (a refused site, say). `source`: the child's
    name in JSON lines."""
    plain = not sys.stdout.isatty()  # a log file or a pipe: colour codes would be noise there

    def relay() -> None:
        for line in proc.stdout:
            if _log_format == "json":
                sys.stdout.write(json_line(without_colours(line), source) + "\n")
            else:
                sys.stdout.write(without_colours(line) if plain else line)
            note = watch(line) if watch is not None else None
            if note:
                say(f"fedmi: {note}", "warning")
            sys.stdout.flush()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return thread


def run_foreground(argv: list[str], env: dict[str, str], on_start: Callable[[subprocess.Popen], None] | None = None,
                   watch: Callable[[str], str | None] | None = None,
                   alive: Callable[[], bool] | None = None, source: str = "flower",
                   restart: Callable[[int], bool] | None = None) -> int:
    """Run a Flower program until it ends, `alive()` turns false, or this process is interrupted
    (Ctrl-C, SIGTERM); its exit status. Its output is relayed (`relay_output`). A program that
    ends by itself is started again while `restart(exit status)` says so."""
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stopping.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            proc = start_child(argv, env)
            relay = relay_output(proc, watch, source)
            try:
                if on_start is not None:
                    on_start(proc)
                while proc.poll() is None and not stopping and (alive is None or alive()):
                    time.sleep(0.2)
            finally:
                stop_process_group(proc)
                relay.join(timeout=5)
            code = proc.returncode if proc.returncode is not None else 0
            if stopping or (alive is not None and not alive()) or restart is None or not restart(code) or stopping:
                return code  # (stopping again: an interruption while `restart` waited)
    finally:
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
