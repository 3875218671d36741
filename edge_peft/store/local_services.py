"""A PostgreSQL cluster and an S3-compatible server (moto) on loopback, in a temp directory: for the tests
and the benchmark. Both are real servers in their own processes; both are gone when stopped."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .local_server import free_port, stop_process

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "edge-peft-test", "AWS_SECRET_ACCESS_KEY": "edge-peft-test",
                  "AWS_DEFAULT_REGION": "us-east-1"}
SPILL_BYTES = 1 << 20  # moto keeps objects up to this size in memory, larger ones in temp files


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl (PATH, then Debian's /usr/lib/postgresql/N/bin), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def moto_server() -> list[str] | None:
    """The command that starts moto's standalone server, or None when moto[server] is not installed."""
    local = Path(sys.executable).with_name("moto_server")
    if local.exists():
        return [str(local)]
    found = shutil.which("moto_server")
    return [found] if found else None


class LocalPostgres:
    """``initdb`` + ``pg_ctl start`` on 127.0.0.1:<free port>, trust authentication, data in a temp directory.

    PostgreSQL refuses to run as root, so as root the cluster belongs to ``user`` (default ``nobody``) and its
    commands run through ``runuser``. ``durable=False`` turns fsync off (tests); the benchmark keeps it on.
    """

    def __init__(self, durable: bool = True, user: str = "nobody") -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)")
        self.durable = durable
        self.as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="edge-peft-pg-"))
        if self.as_user:
            shutil.chown(self.root, user)
        self.port = free_port()
        self.dsn = f"postgresql://edge@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed: {(result.stderr or result.stdout)[-2000:]}")

    def start(self) -> "LocalPostgres":
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "edge", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", options, "start")
        return self

    def new_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.dsn.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                            "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalS3:
    """moto's standalone S3 server on 127.0.0.1:<free port>; ``env`` holds what a client needs to reach it."""

    def __init__(self) -> None:
        self.command = moto_server()
        if self.command is None:
            raise FileNotFoundError('moto\'s S3 server is not installed (pip install "moto[server]")')
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.log = Path(tempfile.mkstemp(prefix="edge-peft-s3-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "LocalS3":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([*self.command, "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(SPILL_BYTES)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text()[-2000:]}")
            try:
                httpx.get(self.endpoint, timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {timeout} s")

    def new_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its ``s3://`` URL."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                     aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        stop_process(self.process)
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
