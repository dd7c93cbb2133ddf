"""A server inside this process, on a free loopback port, in a thread of its own (benchmarks and tests)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request


class LocalServer:
    def __init__(self, app, *, ready_within: float = 300.0):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, name="plutao-local-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:  # (ready: every program compiled)
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the server at {self.url} was not ready within {ready_within:g} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
