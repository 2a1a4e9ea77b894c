"""Running the real server (uvicorn on 127.0.0.1, a free port) in a thread for the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lmforge.serving.http import App, uvicorn_server


@contextmanager
def running(app: App, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a port the system picks) in a thread; yield its base URL; stop it."""
    server = uvicorn_server(app, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
