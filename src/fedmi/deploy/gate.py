"""Only the operator drives the server: a filter in front of the SuperLink's HTTP app.

Flower 1.42 serves its Fleet API (the sites), Control API (start, stop and list runs, logs,
register keys) and Runtime API (the ServerApp's link) on one port, and outside Flower's
enterprise build the Control API accepts every request. TLS authenticates the server only, so
`ca.pem` is no credential. fedmi therefore serves, on that port:

- `/v1/fleet/*` to everyone: Flower's own site authentication (enrolled keys) guards it;
- `/v1/control/*` only to a request from this machine's loopback (127.0.0.1 or ::1) that carries
  the operator's token (`operator.token` in the server's state folder, readable by its owner
  only) in the `x-fedmi-operator` header: fedmi's own commands send it;
- `/v1/runtime/*` only from loopback, where fedmi's task executor claims the ServerApp's task
  with Flower's SuperExec secret (`--isolation process`); every other Runtime call needs the
  task's token, which only that claim hands out;
- nothing else (`/docs`, `/health`, the model endpoints): 403.

A filter in the SuperLink's own process, not a proxy in front of it: the client's address is the
socket's (uvicorn trusts forwarding headers only from 127.0.0.1, which is local anyway), and there
is no second server to install, configure or keep in step with Flower's routes.
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

log = logging.getLogger("fedmi")

OPERATOR_HEADER = "x-fedmi-operator"
LOOPBACK = frozenset({"127.0.0.1", "::1"})  # the server machine itself (127.0.0.2 and the like are not)


def read_secret(path: Path, what: str) -> bytes:
    """A secret file's bytes (one line, stripped); a FedmiError naming the file when unreadable or empty."""
    from fedmi.errors import FedmiError

    try:
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise FedmiError(f"cannot read the {what} at {path} ({e.strerror}): run this on the server's machine, "
                         "as its operator, with --state as given to `fedmi server`") from None
    if not secret:
        raise FedmiError(f"the {what} at {path} is empty")
    return secret


class OperatorGate:
    """ASGI middleware: the Fleet API for everyone, Control and Runtime for the operator (above).

    Args:
      app: the SuperLink's ASGI app.
      operator_token: the token a Control request must carry.
    Example: ``fastapi_app.add_middleware(OperatorGate, operator_token=b"...")``.
    """

    def __init__(self, app, operator_token: bytes):
        self.app = app
        self.token = operator_token

    def allowed(self, path: str, client: str | None, headers: list[tuple[bytes, bytes]]) -> str | None:
        """None when the request may pass, else why not."""
        if path.startswith("/v1/fleet/"):
            return None
        if client not in LOOPBACK:
            return "only the Fleet API is served to other machines"
        if path.startswith("/v1/runtime/"):
            return None
        if path.startswith("/v1/control/"):
            given = next((v for k, v in headers if k.lower() == OPERATOR_HEADER.encode()), b"")
            return None if hmac.compare_digest(given, self.token) else "the Control API needs the operator's token"
        return "not served"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: the SuperLink's own start-up and shutdown
            return await self.app(scope, receive, send)
        client = scope.get("client")
        host = client[0] if client else None
        why = self.allowed(scope.get("path", ""), host, scope.get("headers", []))
        if why is None:
            return await self.app(scope, receive, send)
        log.warning("refused %s %s from %s: %s", scope.get("method"), scope.get("path"), host, why)
        body = json.dumps({"error": f"fedmi: refused: {why}"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
