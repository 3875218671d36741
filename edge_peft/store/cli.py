"""Click commands of the adapter store: ``serve``, ``store`` (admin group), ``push``, ``pull``, ``sync``.

Secrets go to stdout alone (``TOKEN=$(edge-peft store add-device phone-17)``); notes go to stderr.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from pathlib import Path
from typing import Iterator

import click

from ..adapters.compressed import FP32
from ..adapters.updates import UPDATE_ENCODINGS
from ..errors import UserError
from .auth import ADMIN_TOKEN_ENV
from .limits import DEFAULT_MAX_DEVICE_BYTES, DEFAULT_MAX_DEVICE_VERSIONS, DEFAULT_RATE_PER_MINUTE
from .storage import StoreError

DATA_DIR = click.option("--data-dir", default="./store", show_default=True,
                        type=click.Path(file_okay=False, path_type=Path), help="The store's directory (SQLite + blobs).")
EXIT_QUEUED = 75  # sysexits' EX_TEMPFAIL: `push` queued the adapter in the outbox, the store did not acknowledge it
STORE_URL = click.option("--store", "store_url", envvar="EDGE_PEFT_STORE", help="Store URL (or EDGE_PEFT_STORE).")
TOKEN = click.option("--token", envvar="EDGE_PEFT_TOKEN", help="Device token (or EDGE_PEFT_TOKEN).")
ADMIN_STORE = click.option("--store", "store_url", default=None,
                           help="Act over HTTP on this store URL instead of on --data-dir (needs --admin-token).")
ADMIN_TOKEN = click.option("--admin-token", envvar=ADMIN_TOKEN_ENV, help=f"Admin token (or {ADMIN_TOKEN_ENV}).")


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Store refusals and network failures become UserError (one line, exit 2)."""
    from .client import StoreUnreachable

    try:
        yield
    except StoreError as exc:
        raise UserError(str(exc)) from None
    except StoreUnreachable as exc:
        raise UserError(f"{exc}: check --store and that `edge-peft serve` is running") from None


def _open_local(data_dir: Path):
    """The embedded store in ``data_dir``; announces the admin token if this call created the store."""
    from .service import AdapterStore

    store, admin_token = AdapterStore.open(data_dir)
    if admin_token:
        click.echo(f"created store in {data_dir}; admin token (shown once, keep it secret): {admin_token}", err=True)
    return store


@click.command()
@DATA_DIR
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="TCP port to listen on.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Refuse (413) larger pushes.")
@click.option("--max-device-versions", default=DEFAULT_MAX_DEVICE_VERSIONS, show_default=True,
              type=click.IntRange(min=1), help="Refuse (413) a push beyond this many versions kept per device.")
@click.option("--max-device-mb", default=DEFAULT_MAX_DEVICE_BYTES >> 20, show_default=True,
              type=click.IntRange(min=1), help="Refuse (413) a push beyond this many MiB kept per device.")
@click.option("--rate-limit", default=DEFAULT_RATE_PER_MINUTE, show_default=True, type=click.IntRange(min=1),
              help="Requests a minute per device (bursts of ten seconds' worth); more are answered 429.")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="TLS certificate chain (PEM).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
@click.option("--database", envvar="EDGE_PEFT_DATABASE",
              help="postgresql://USER@HOST:PORT/DB for the metadata (or EDGE_PEFT_DATABASE; password in PGPASSWORD); "
                   "default: SQLite in --data-dir.")
@click.option("--blobs", help="s3://BUCKET/PREFIX for the adapter files (credentials and region from the AWS_* "
                              "variables); default: --data-dir/blobs.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL (MinIO, a local server).")
@click.option("--s3-region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Server processes sharing the port (uvicorn workers); several suit PostgreSQL + S3.")
@click.option("--keep-alive", default=75, show_default=True, type=click.IntRange(min=1),
              help="Seconds an idle connection stays open: longer than a load balancer's idle timeout (often 60 s), "
                   "so that the balancer, not the store, closes it and no request races the close.")
def serve(data_dir: Path, host: str, port: int, max_body_mb: float, max_device_versions: int, max_device_mb: int,
          rate_limit: int, ssl_keyfile: str | None, ssl_certfile: str | None, log_level: str, database: str | None,
          blobs: str | None, s3_endpoint: str | None, s3_region: str | None, processes: int, keep_alive: int) -> None:
    """Run the adapter store (OpenAPI docs at /docs, the fleet page at /). The first start prints the admin token."""
    import uvicorn

    from .backends import StoreLocation, open_store
    from .limits import StoreLimits
    from .server import announce_admin_token, create_app

    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise UserError("TLS needs both --ssl-keyfile and --ssl-certfile")
    if not ssl_keyfile and not _is_loopback(host):
        click.echo(f"warning: serving plain HTTP on {host}: tokens cross the network in clear; pass "
                   "--ssl-keyfile/--ssl-certfile or put a TLS proxy in front", err=True)
    sock = _listen(host, port)  # before the store is created: a busy port leaves nothing behind
    location = StoreLocation(data_dir, database, blobs, s3_endpoint, s3_region)
    limits = StoreLimits(int(max_body_mb * (1 << 20)), max_device_versions, max_device_mb << 20, rate_limit)
    with _one_line_errors():
        store, admin_token = open_store(location, limits)  # migrates once, before any worker starts
    announce_admin_token(admin_token)
    server = {"ssl_keyfile": ssl_keyfile, "ssl_certfile": ssl_certfile, "log_level": log_level,
              "timeout_keep_alive": keep_alive}
    if processes == 1:
        uvicorn.Server(uvicorn.Config(create_app(store, limits), host=host, port=port, **server)).run(sockets=[sock])
        return
    _serve_workers(location, limits, processes, host, port, sock, server)


def _serve_workers(location, limits, processes: int, host: str, port: int, sock, server: dict) -> None:
    """``processes`` uvicorn workers on one socket, each opening the store from the environment."""
    import json
    import os
    from dataclasses import asdict

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from .server import SERVE_ENV

    os.environ[SERVE_ENV] = json.dumps({"location": location.to_json(), "limits": asdict(limits)})
    config = uvicorn.Config("edge_peft.store.server:app_from_environment", factory=True, workers=processes,
                            host=host, port=port, **server)
    Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()


def _listen(host: str, port: int):
    """A socket bound to ``host:port``, or a one-line error naming the address and the fix."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or stop what "
                        "uses it") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.group()
def store() -> None:
    """Administer the store: bases, devices and tokens, aggregation, listing (locally on --data-dir, or over HTTP)."""


@store.command("add-device")
@click.argument("device_id")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def add_device(device_id: str, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Register DEVICE_ID and print its token (shown once; only its hash is stored)."""
    token = _admin_call(data_dir, store_url, admin_token, lambda s: s.add_device(device_id),
                        lambda c: c.add_device(device_id))
    click.echo(f"registered device {device_id}; its token follows (shown once, keep it secret)", err=True)
    click.echo(token)


def _admin_call(data_dir: Path, store_url: str | None, admin_token: str | None, local, remote):
    """Run ``local(store)`` on --data-dir, or ``remote(client)`` over HTTP with --store; one-line errors."""
    from .client import StoreClient

    with _one_line_errors():
        if store_url:
            with StoreClient(store_url, admin_token) as client:
                return remote(client)
        return local(_open_local(data_dir))


@store.command("add-base")
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def add_base(artifact: Path, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Register the base model of ARTIFACT (its directory or manifest.json): devices may then push for it."""
    from .bases import spec_of_artifact

    spec = spec_of_artifact(artifact).to_dict()
    created = _admin_call(data_dir, store_url, admin_token, lambda s: s.add_base(spec)[1],
                          lambda c: c.add_base(spec)["created"])
    verb = "registered" if created else "already registered, same spec:"
    click.echo(f"{verb} base {spec['base_fingerprint']} ({spec['variant']} r={spec['rank']}, "
               f"{len(spec['modules'])} modules)")


@store.command("remove-base")
@click.argument("fingerprint")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def remove_base(fingerprint: str, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Remove a base with every device and global version of it."""
    from dataclasses import asdict

    removed = _admin_call(data_dir, store_url, admin_token, lambda s: asdict(s.remove_base(fingerprint)),
                          lambda c: c.remove_base(fingerprint))
    click.echo(f"removed base {fingerprint} ({removed['blobs']} files deleted)")


@store.command("remove-device")
@click.argument("device_id")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def remove_device(device_id: str, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Remove DEVICE_ID: its token stops working and its versions are deleted (global versions stay)."""
    from dataclasses import asdict

    removed = _admin_call(data_dir, store_url, admin_token, lambda s: asdict(s.remove_device(device_id)),
                          lambda c: c.remove_device(device_id))
    click.echo(f"removed device {device_id} ({removed['blobs']} files deleted); aggregate again to drop it from "
               "the global version")


@store.command("rotate-token")
@click.argument("device_id")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def rotate_token(device_id: str, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Print a new token for DEVICE_ID (shown once); its old token stops working."""
    token = _admin_call(data_dir, store_url, admin_token, lambda s: s.rotate_token(device_id),
                        lambda c: c.rotate_token(device_id))
    click.echo(f"new token for device {device_id} follows (shown once, keep it secret); the old one no longer works",
               err=True)
    click.echo(token)


@store.command("revoke-token")
@click.argument("device_id")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
def revoke_token(device_id: str, data_dir: Path, store_url: str | None, admin_token: str | None) -> None:
    """Revoke DEVICE_ID's token: the store refuses it until `rotate-token` issues a new one; versions stay."""
    _admin_call(data_dir, store_url, admin_token, lambda s: s.revoke_token(device_id),
                lambda c: c.revoke_token(device_id))
    click.echo(f"revoked the token of device {device_id}")


@store.command()
@click.option("--base", required=True, help="Base model fingerprint (the manifest's base_fingerprint).")
@DATA_DIR
@ADMIN_STORE
@ADMIN_TOKEN
@click.option("--min-devices", type=click.IntRange(min=1),
              help="Refuse a global version of fewer devices (default 3: no device's adapter can be read back).")
@click.option("--weighting", type=click.Choice(["equal", "samples"]),
              help="Weigh devices equally (default) or by the samples they report, capped by --sample-cap.")
@click.option("--sample-cap", type=click.IntRange(min=1),
              help="With --weighting samples: most samples one device counts (default: 10 x the median device's).")
@click.option("--clip-norm", help="Scale each device's B down to at most this L2 norm: a number, 'auto' (default: the "
                                  "median of the devices' norms) or 'off'.")
@click.option("--method", type=click.Choice(["mean", "median", "trimmed-mean"]),
              help="How devices are combined: the mean (default) or a coordinate-wise robust mean.")
@click.option("--trim", type=click.FloatRange(0, 0.5, max_open=True),
              help="With --method trimmed-mean: the fraction dropped at each end (default 0.1).")
def aggregate(base: str, data_dir: Path, store_url: str | None, admin_token: str | None, min_devices: int | None,
              weighting: str | None, sample_cap: int | None, clip_norm: str | None, method: str | None,
              trim: float | None) -> None:
    """Average the latest adapter of every device into a new global version (robust by default)."""
    from dataclasses import asdict

    from .aggregate import AggregationPolicy

    given = {"min_devices": min_devices, "weighting": weighting, "sample_cap": sample_cap,
             "clip_norm": _clip_norm(clip_norm), "method": method, "trim": trim}
    policy = {k: v for k, v in given.items() if v is not None}

    def local(store) -> dict:
        record, created, report = store.aggregate(base, AggregationPolicy.from_dict(policy))
        return {**asdict(record), "created": created, "report": report}

    result = _admin_call(data_dir, store_url, admin_token, local, lambda c: c.aggregate(base, policy))
    if result["created"]:
        clipped = result["report"].get("clipped", 0)
        click.echo(f"global version {result['number']}: {len(result['inputs'])} device(s), {result['samples']} samples, "
                   f"{clipped} clipped, sha256 {result['full_sha256'][:12]}")
    else:
        click.echo(f"no device pushed since global version {result['number']}: nothing new to aggregate")


def _clip_norm(value: str | None) -> float | str | None:
    if value is None or value in ("auto", "off"):
        return value
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--clip-norm {value!r} is not a number, 'auto' or 'off'") from None


@store.command("list")
@DATA_DIR
def list_store(data_dir: Path) -> None:
    """List devices, bases, versions and global versions of the store in --data-dir."""
    local = _open_local(data_dir)
    for d in local.metadata.devices():
        click.echo(f"device {d.id}  created {d.created}  last seen {d.last_seen or 'never'}")
    for b in local.metadata.bases():
        spec = b.spec
        click.echo(f"base {b.fingerprint}  {spec['architecture']} {spec['variant']} r={spec['rank']} "
                   f"{len(spec['modules'])} modules  registered {b.created}")
        for v in local.metadata.versions(b.fingerprint):
            click.echo(f"  device {v.device} v{v.number}  samples {v.samples}  steps {v.steps}  sha256 {v.sha256[:12]}")
        for a in local.metadata.aggregates(b.fingerprint):
            click.echo(f"  global v{a.number}  {len(a.inputs)} inputs  samples {a.samples}  sha256 {a.full_sha256[:12]}")


@store.command("reset-admin-token")
@DATA_DIR
def reset_admin_token(data_dir: Path) -> None:
    """Replace a lost admin token (local --data-dir only); the old one stops working."""
    click.echo("new admin token follows (shown once, keep it secret)", err=True)
    click.echo(_open_local(data_dir).reset_admin_token())


def _print_ack(entry, ack: dict) -> None:
    verb = "pushed" if ack["created"] else "already stored as"
    click.echo(f"{verb} version {ack['number']} of device {ack['device']} (sha256 {ack['sha256'][:12]})")


def _print_refusal(moved: Path, refusal: Exception) -> None:
    click.echo(f"{refusal}: moved to {moved}, it will not be sent again", err=True)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@STORE_URL
@TOKEN
@click.option("--device", help="Device id (default: the one the token names).")
@click.option("--b-only/--full", default=None,
              help="Send only B (LoRA-FA default; the store regenerates A from the seeds) or the full file.")
@click.option("--rank", type=click.IntRange(min=1),
              help="Send the rank-RANK adapter of a run trained with --nested-ranks: a smaller upload.")
@click.option("--encoding", type=click.Choice(UPDATE_ENCODINGS), default=FP32, show_default=True,
              help="int8: matrices as int8 with per-channel scales (4x smaller); int8-topk: the --topk largest changes "
                   "since the global version the run trained from.")
@click.option("--topk", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="int8-topk: the fraction of each matrix's entries sent.")
def push(run_dir: Path, store_url: str | None, token: str | None, device: str | None, b_only: bool | None,
         rank: int | None, encoding: str, topk: float) -> None:
    """Push RUN_DIR's adapter; when the store is unreachable, queue it in RUN_DIR/outbox for `sync`."""
    from .client import StoreUnreachable, build_push, device_of, enqueue, flush

    if not store_url:
        raise UserError("no store given: pass --store URL or set EDGE_PEFT_STORE")
    device = device_of(token, device)
    base, meta, data = build_push(run_dir, b_only, rank, encoding, topk)
    entry, _ = enqueue(run_dir, base, meta, data, store_url)
    try:
        flush(run_dir, store_url, token, device, attempts=1, on_ack=_print_ack, on_refused=_print_refusal)
    except StoreUnreachable as exc:
        click.echo(f"{exc}: queued in {entry.path}; run `edge-peft sync {run_dir} --store {store_url} --token "
                   "$EDGE_PEFT_TOKEN` when the store is back (exit status 75: queued, not delivered)")
        sys.exit(EXIT_QUEUED)


@click.command()
@STORE_URL
@TOKEN
@click.option("--base", required=True, help="Base model fingerprint (the manifest's base_fingerprint).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Adapter directory to write.")
@click.option("--device", help="Pull this device's adapter.")
@click.option("--global", "global_", is_flag=True, help="Pull the global (aggregated) adapter (the default).")
@click.option("--version", type=click.IntRange(min=1), help="Version number (default: latest).")
def pull(store_url: str | None, token: str | None, base: str, out: Path, device: str | None, global_: bool,
         version: int | None) -> None:
    """Pull an adapter into --out as a loadable PEFT directory (skipped when already up to date)."""
    from .client import StoreClient, pull as pull_adapter

    if device and global_:
        raise UserError("pass either --device or --global, not both")
    with _one_line_errors(), StoreClient(store_url or "", token) as client:
        pulled = pull_adapter(client, base, out, device, version)
    if pulled is None:
        click.echo(f"{out} is up to date")
    else:
        who = f"device {pulled['device']}" if pulled["device"] else "global"
        click.echo(f"pulled {who} version {pulled['version']} into {out} (sha256 {pulled['sha256'][:12]})")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@STORE_URL
@TOKEN
@click.option("--device", help="Device id (default: the one the token names).")
@click.option("--attempts", default=5, show_default=True, type=click.IntRange(min=1), help="Tries per adapter.")
@click.option("--backoff", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="First wait in seconds; doubles per retry, at most 30 s.")
def sync(run_dir: Path, store_url: str | None, token: str | None, device: str | None, attempts: int,
         backoff: float) -> None:
    """Send the pushes queued in RUN_DIR/outbox, oldest first, retrying with exponential backoff."""
    from .client import StoreUnreachable, flush, pending

    try:
        sent = flush(run_dir, store_url, token, device, attempts=attempts, backoff=backoff, on_ack=_print_ack,
                     on_refused=_print_refusal)
    except StoreUnreachable as exc:
        left = len(pending(run_dir))
        raise UserError(f"{exc}; {left} adapter(s) still queued in {run_dir / 'outbox'}: run sync again later") from None
    click.echo(f"outbox empty ({sent} sent)")
