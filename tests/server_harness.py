"""Start `enginesmith serve`'s app on loopback for tests: uvicorn in a background thread, or
the real command in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn

from enginesmith.scripts.benchmarks.serve_load import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """APP served by uvicorn on 127.0.0.1 in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app: Any, ready_timeout_s: float = 60.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_healthy(self.url, ready_timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def start_subprocess(engine_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`enginesmith serve ENGINE_DIR` on a free loopback port; returns (process, base url)."""
    port = free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enginesmith.runtime.cli",
            "serve",
            str(engine_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"
