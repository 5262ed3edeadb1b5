"""Put on PYTHONPATH by the deployment tests: every Python process of the federation (server,
sites, Flower's helpers and app processes) records each network address it resolves or connects
to, and each program it starts, in the file $FEDMI_NET_AUDIT (one JSON line per event)."""

import json
import os
import sys

_PATH = os.environ.get("FEDMI_NET_AUDIT")


def _audit(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.getaddrinfo", "subprocess.Popen"):
        try:
            if event == "socket.getaddrinfo":
                what = [str(args[0])]
            elif event == "subprocess.Popen":
                what = [str(args[0])]
            else:
                address = args[1] if event == "socket.connect" else args[-1]
                what = [str(address[0]) if isinstance(address, tuple) else f"unix:{address!r}"]
            with open(_PATH, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "event": event, "what": what}) + "\n")
        except Exception:  # auditing must never break the audited program
            pass


if _PATH:
    sys.addaudithook(_audit)
