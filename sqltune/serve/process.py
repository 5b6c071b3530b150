"""`sqltune serve` as a child process on a free loopback port: what the tests and the load
benchmark start, and what any script can use to bring a model up and down.

    with ServerProcess(["--model", "models/sqltune-sql"]) as server:
        httpx.post(server.url + "/v1/sql", json={...})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A `sqltune serve` child on 127.0.0.1; `start()` returns once /ready says 200."""

    def __init__(self, args: Sequence[str], *, python: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 300.0, cwd: str | Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python or sys.executable
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="sqltune-serve-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Start the process without waiting (start several, then `wait_ready()` each)."""
        self.proc = subprocess.Popen([self.python, "-m", "sqltune", "serve", *self.args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        return self

    def wait_ready(self) -> ServerProcess:
        import httpx

        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sqltune serve exited {self.proc.returncode} before it was ready:\n{self.log()[-6000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"sqltune serve was not ready within {self.ready_timeout:g}s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits by itself."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
