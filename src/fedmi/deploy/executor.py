"""fedmi's task executor: the long-lived process part that runs Flower's app tasks, in place of
Flower's SuperExec (`--isolation process` on the SuperLink and the SuperNodes).

Flower's SuperExec starts a fresh `flwr-clientapp` process for every message a site receives
(seconds of imports: torch, MONAI, fedmi) and hands each app process its task token on the
command line, where any local user reads it in `ps`. fedmi's executor instead

- claims tasks from the Runtime API with Flower's SuperExec secret (HMAC-signed requests), so no
  other process can claim them: the secret is made afresh at every start, in a file only this
  account can read;
- at a site, runs every ClientApp task in this process (`run_client_task`): torch and the site's
  data are loaded once, a round costs its computation and the network, and the site keeps its
  own record of every task (`SiteRecords`);
- on the server, starts each run's ServerApp in a child process (`ServerAppLauncher`) that reads
  its token on standard input and dies with this process.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


@dataclass
class RuntimeLink:
    """A Runtime API: `address` (HOST:PORT) and the CA certificate to verify it by (None: plain
    HTTP, a SuperNode's own loopback port)."""

    address: str
    ca: Path | None = None

    def client(self, *interceptors):
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.ca is None,
            root_certificates=None if self.ca is None else self.ca.read_bytes(),
            interceptors=list(interceptors), retry_invoker=_retry_invoker())


def _retry_invoker():
    """Retries as Flower's `make_simple_http_retry_invoker` does (a connection that failed, 502, 503,
    504), but a refusal (401: a token the restarted SuperNode does not know) is an error of this
    task alone. Flower's sends SIGINT to the whole process on a 401, which would stop the site."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=20), max_tries=None, max_time=None,
                        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
                        should_giveup=lambda e: isinstance(e, httpx.HTTPStatusError)
                        and e.response.status_code not in _ASK_AGAIN)


_ASK_AGAIN = (502, 503, 504)  # a SuperNode starting or busy: the request is made again


def make_secret_file(prefix: str) -> Path:
    """A fresh random secret in a file of a private temporary folder (0700, the file 0600)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    path = folder / "secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def serve_tasks(link: RuntimeLink, secret: bytes, task_type: str, run: Callable[[str, object], None],
                stop: threading.Event, poll: float = 0.05) -> None:
    """Claim tasks of `task_type` from `link` until `stop` is set; `run(token, task)` each.

    A Runtime API that does not answer yet (its server still starting) is asked again."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

    client = link.client(RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                         SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE}))
    try:
        while not stop.is_set():
            try:
                found = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
            except httpx.HTTPError as e:
                log.debug("runtime API at %s: %s", link.address, e)
                stop.wait(1.0)
                continue
            if found.HasField("task") and found.token:
                try:
                    run(found.token, found.task)
                except Exception as e:  # noqa: BLE001 - one task's failure must not stop the executor
                    log.error("a %s task could not be completed: %s: %s", task_type, type(e).__name__, e)
            else:
                stop.wait(poll)
    finally:
        client.close()


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


# -- the site -----------------------------------------------------------------------------------
class SiteRecords:
    """What a site keeps on its own disk (`fedmi site --state`):

    - `tasks.jsonl`: one line per task it ran (time, run, round, kind, method, bytes in and out, seconds
      in all and of them pulling the message and running the method, outcome and, when refused
      or failed, why);
    - `connected`: the server this site was last activated at (a refusal after a restart may then
      be its earlier connection, still counted as online there);
    - `runs/RUN_ID.state`: the site's state in each run (FedBN's statistics, SCAFFOLD's control
      variate, optimiser moments: everything a method keeps at the site), written atomically
      after every task, read back when the site restarts in the middle of a run.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / "runs").mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self._lock = threading.Lock()

    def claim(self) -> None:
        """Hold the folder for this process: two sites sharing one state folder would mix their
        states in a run. Released when the process ends, however it ends (an advisory lock)."""
        import fcntl

        self._held = open(self.folder / "lock", "w")
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._held.close()
            raise FedmiError(f"{self.folder} is the state folder of a fedmi site that is running; "
                             "give each site on this machine its own --state") from None

    def connected_before(self, address: str) -> bool:
        """Whether this site was activated at the server at `address` before (`connected`)."""
        marker = self.folder / "connected"
        return marker.is_file() and marker.read_text().strip() == address

    def mark_connected(self, address: str) -> None:
        (self.folder / "connected").write_text(address + "\n")

    def state_path(self, run_id: int) -> Path:
        return self.folder / "runs" / f"{int(run_id)}.state"

    def restore(self, context) -> bool:
        """Fill an empty `context.state` from this run's checkpoint; whether it did."""
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        path = self.state_path(context.run_id)
        if len(context.state) or not path.is_file():
            return False
        proto = ProtoRecordDict()
        proto.ParseFromString(path.read_bytes())
        restored = recorddict_from_proto(proto)
        for key, record in restored.items():
            context.state[key] = record
        return len(restored) > 0  # a checkpoint of a state still empty (after the run's query) restores nothing

    def save(self, context) -> None:
        from flwr.common.serde import recorddict_to_proto

        path = self.state_path(context.run_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(recorddict_to_proto(context.state).SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def log_task(self, **fields) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})
        with self._lock, open(self.folder / "tasks.jsonl", "a") as f:
            f.write(line + "\n")


def _task_heartbeat(client) -> Callable[[], bool]:
    """A task's heartbeat to the SuperNode, as Flower's `make_task_heartbeat_fn_http` sends it, but
    without its reaction to a SuperNode that no longer knows the task (it restarted, with the
    server): Flower's raises SIGINT in the whole process, which would stop the site. Here the
    task fails on its own (its token is refused) and the site goes on with the next."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # asked again (Flower's HeartbeatSender retries)
        except httpx.HTTPStatusError as e:
            return e.response.status_code not in _ASK_AGAIN
        return True

    return beat


def _method(content) -> str | None:
    """The local method a fedmi task names (None: a query, or a stock Flower request)."""
    from fedmi.runtime.flower import codec

    try:
        _, task, _ = codec.read_task(content)
    except ValueError:  # not JSON: the ClientApp refuses it, with its reason
        return None
    trainer = (task or {}).get("trainer")
    return trainer.get("name") if isinstance(trainer, dict) else None


def _array_bytes(content) -> int:
    return sum(rec.count_bytes() for rec in content.array_records.values())


def run_client_task(link: RuntimeLink, token: str, app, records: SiteRecords) -> None:
    """One ClientApp task, in this process: pull its message and context, check the app bundle,
    run fedmi's ClientApp, push the reply and the context back, keep the state and the record."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedmi.deploy.app_pin import check_app_bundle

    started = time.perf_counter()
    client = link.client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                         RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(_task_heartbeat(client))
    heartbeat.start()
    message = context = reply = None
    # What is known of the task before its message is pulled: nothing (the pull itself may fail).
    status, details, entry = SubStatus.FAILED, "", {"run": None, "round": None, "kind": None}
    try:
        message, context, run, fab = pull_task_input(client)
        pulled = time.perf_counter()
        entry = {"run": int(context.run_id), "round": message.metadata.group_id or None,
                 "kind": message.metadata.message_type, "method": _method(message.content),
                 "bytes_in": _array_bytes(message.content)}
        check_app_bundle(fab.content)
        if records.restore(context):
            log.info("run %d: the site's state restored from %s", context.run_id,
                     records.state_path(context.run_id))
        reply = app(message=message, context=context)
        entry["seconds_pull"], entry["seconds_run"] = round(pulled - started, 4), round(time.perf_counter() - pulled, 4)
        if reply.has_error():
            entry.update(outcome="refused" if "refused" in (reply.error.reason or "") else "failed",
                         reason=(reply.error.reason or "").strip().splitlines()[-1:])
        else:
            entry["outcome"] = "done"
            records.save(context)
        status = SubStatus.COMPLETED
    except Exception as e:  # noqa: BLE001 - the task fails; the site goes on serving
        reason = str(e) if isinstance(e, FedmiError) else f"{type(e).__name__}: {e}"
        log.error("a task failed: %s", reason, exc_info=not isinstance(e, FedmiError))
        details, entry["outcome"], entry["reason"] = reason, "failed", reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                entry["bytes_out"] = 0 if reply.has_error() else _array_bytes(reply.content)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as e:  # noqa: BLE001 - the SuperNode went away (restarted) with the task
            log.warning("a task's result could not be returned: %s: %s", type(e).__name__, e)
            entry.update(outcome="failed", reason=f"not returned: {type(e).__name__}: {e}")
        finally:
            heartbeat.stop()
            client.close()
        entry["seconds"] = round(time.perf_counter() - started, 4)
        records.log_task(**entry)


# -- the server ---------------------------------------------------------------------------------
class ServerAppLauncher:
    """Starts each run's ServerApp (fedmi's pinned `flwr-serverapp`) as a child of this process:
    its token in a file of a private folder that the child reads and removes at once (app_pin), never
    on a command line; dead with this process however it dies."""

    def __init__(self, link: RuntimeLink, launchers: Path, env: dict[str, str],
                 relay: Callable[[subprocess.Popen], None], private: Path):
        self.link, self.launchers, self.env, self.relay, self.private = link, launchers, env, relay, private
        self.children: list[subprocess.Popen] = []

    def __call__(self, token: str, task) -> None:
        from fedmi.deploy.processes import die_with_parent

        token_file = self.private / f"task-{task.task_id}.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        argv = [str(self.launchers / "flwr-serverapp"), "--runtime-api-address", self.link.address,
                "--token-file", str(token_file), "--parent-pid", str(os.getpid())]
        argv += ["--insecure"] if self.link.ca is None else ["--root-certificates", str(self.link.ca)]
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                preexec_fn=die_with_parent)
        self.children = [p for p in self.children if p.poll() is None] + [proc]
        self.relay(proc)
        start_thread(proc.wait, f"fedmi-reap-{proc.pid}")  # reaped when it ends: no defunct ServerApps
        log.info("run %d: its ServerApp started (pid %d)", task.run_id, proc.pid)

    def stop(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
