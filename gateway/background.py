"""The gateway served by uvicorn on a background thread of this process (the demo and the tests use it)."""
from __future__ import annotations

import threading
import time


class BackgroundGateway:
    def __init__(self, app, port: int, host: str = "127.0.0.1", startup_timeout_s: float = 30.0):
        import uvicorn

        self.url = f"http://{host}:{port}"
        self.startup_timeout_s = startup_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    def __enter__(self) -> "BackgroundGateway":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"the gateway did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
