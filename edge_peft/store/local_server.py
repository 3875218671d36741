"""A real store server on a free loopback port, in a subprocess: for the demo, the tests and the benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``process`` is still running after ``timeout`` seconds."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class StoreServer:
    """``python -m edge_peft.store serve`` on 127.0.0.1 in a subprocess; output goes to ``<data_dir>.log``.

    ``options`` are more ``serve`` options (``{"--rate-limit": 60}``); ``max_file_bytes`` limits the size of
    any file the server writes (RLIMIT_FSIZE), so a bigger write fails as on a full disk.
    """

    def __init__(self, data_dir: str | os.PathLike, max_body_mb: float = 64.0, port: int | None = None,
                 options: dict[str, object] | None = None, max_file_bytes: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.max_body_mb = max_body_mb
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.data_dir.with_name(self.data_dir.name + ".log")
        self.options = options or {}
        self.max_file_bytes = max_file_bytes
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not started"
        return self.process.pid

    def _limit_file_size(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))

    def start(self, timeout: float = 30.0) -> "StoreServer":
        cmd = [sys.executable, "-m", "edge_peft.store", "serve", "--data-dir", str(self.data_dir), "--port",
               str(self.port), "--max-body-mb", str(self.max_body_mb), "--log-level", "warning",
               *(str(x) for option in self.options.items() for x in option)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=self._limit_file_size if self.max_file_bytes else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"store server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"store server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, as in a crash or power cut of the process."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> "StoreServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
