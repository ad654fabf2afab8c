"""`avatard cluster up` and `avatard cluster status` (registered by `avatard.daemon.cli`).

Imports only click at the top: `avatard --help` must not import Ray. `up` checks the
whole config before it touches Ray, and exits 78 (EX_CONFIG) naming the bad key, so a
systemd unit does not restart it in a loop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import click

# Seconds past cluster.drain_timeout_s that deleting the app may take at a stop.
DELETE_SLACK_S = 15.0

DEFAULT_URL = "http://127.0.0.1:8000"


@click.group()
def cluster() -> None:
    """avatard on a Ray Serve cluster (docs/cluster.md; needs the `cluster` extra)."""


def _config(config_path: str | None, sets: tuple[str, ...]) -> Any:
    """The checked `ClusterConfig`; exits 78 with the bad key on a config error."""
    from avatard.daemon.config import EXIT_CONFIG_ERROR, ConfigError, parse_override

    from .config import load_cluster_config

    try:
        overrides = dict(parse_override(item) for item in sets)
        return load_cluster_config(config_path, overrides)
    except ConfigError as exc:
        click.echo(f"avatard cluster: bad config: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@cluster.command("up")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="cluster.toml ([cluster] keys and the nodes' daemon config under [node]; "
              "docs/cluster.md).")
@click.option("--address", help="Join this running Ray cluster (e.g. auto, or HEAD:6379) "
              "instead of starting a local head for this machine.")
@click.option("--num-gpus", type=click.IntRange(min=0), default=None,
              help="Local head only: GPUs it offers (default: those Ray detects). On a "
              "machine without one, N logical GPUs let N node replicas run CPU daemons.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a key, e.g. --set cluster.max_nodes=4 or "
              "--set node.daemon.workers=2 (repeatable).")
@click.option("--detach", is_flag=True, help="With --address: deploy and exit; the app "
              "keeps running in the cluster (stop it with `serve shutdown`).")
@click.option("--ready-timeout", "ready_timeout_s", type=click.FloatRange(min=1), default=None,
              help="Seconds to wait for the app to run [default: cluster.node_ready_timeout_s "
              "+ 60].")
def up(config_path: str | None, address: str | None, num_gpus: int | None,
       sets: tuple[str, ...], detach: bool, ready_timeout_s: float | None) -> None:
    """Deploy the avatard app and serve until SIGTERM or SIGINT.

    Without --address a local Ray head is started for this machine (bound to 127.0.0.1
    when cluster.http_host is loopback). On SIGTERM/SIGINT the app is deleted (each node
    drains its daemon) and a local head is stopped.
    """
    config = _config(config_path, sets)
    if detach and not address:
        raise click.UsageError("--detach needs --address: a local head ends with this command")
    if num_gpus is not None and address:
        raise click.UsageError("--num-gpus is for a local head; the joined cluster's nodes "
                               "say their own GPUs (ray start --num-gpus)")
    if not address:
        # Serve's proxy shares a port another process listens on (requests would split
        # between the two): refuse before starting anything.
        taken = _port_in_use(config.http_host, config.http_port)
        if taken:
            raise click.ClickException(
                f"port {config.http_port} on {config.http_host} is already in use ({taken}): "
                "another avatard cluster or server listens there; stop it, or give this one "
                "another port (--set cluster.http_port=N)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loopback = config.http_host in ("127.0.0.1", "localhost", "::1")
    if loopback and not address:
        # Else Ray puts the host's IP in place of 127.0.0.1 (read when Ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise click.ClickException(
            "the cluster needs Ray: pip install 'avatard[cluster]'"
        ) from None
    from .app import deploy

    try:
        if address:
            ray.init(address=address, logging_level="warning")
        else:
            resources = {config.ingress_resource: 1.0} if config.ingress_resource else None
            # "local": a new instance even where another Ray runs on this machine
            # (without it ray.init joins the last cluster started here).
            ray.init(address="local", num_gpus=num_gpus, resources=resources,
                     include_dashboard=False, logging_level="warning",
                     **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
    except Exception as exc:  # Ray's own errors: what failed, without a traceback
        where = f"join the Ray cluster at {address}" if address else "start a local Ray head"
        raise click.ClickException(f"could not {where}: {type(exc).__name__}: {exc}") from None
    if not address:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if config.min_nodes and gpus < config.gpus_per_node:
            ray.shutdown()
            raise click.ClickException(
                f"the local Ray head offers {gpus:g} GPUs; each node replica needs "
                f"cluster.gpus_per_node={config.gpus_per_node:g}: use --num-gpus N (on a "
                "machine without a GPU, N logical GPUs run N CPU daemons)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _deploy_within(deploy, config, ready_timeout_s or config.node_ready_timeout_s + 60,
                       stop)
        click.echo(f"avatard cluster: app {config.app_name!r} is running on "
                   f"http://{config.http_host}:{config.http_port} "
                   f"(nodes {config.min_nodes}..{config.max_nodes})")
        if detach:
            return
        click.echo("avatard cluster: SIGTERM or Ctrl-C deletes the app", err=True)
        while not stop.wait(1.0):
            pass
        click.echo("avatard cluster: deleting the app (its nodes drain)", err=True)
        # Bounded: when the signal went to the whole process group (`timeout`, a closed
        # terminal, `kill -- -PGID`), a local head's processes got it too and die, and
        # Serve's calls would wait a minute or more for them. The app and its nodes go
        # with the head then (each daemon drains when its node's end of the pipe closes).
        bound_s = config.drain_timeout_s + DELETE_SLACK_S
        if not _within(lambda: serve.delete(config.app_name), bound_s) or (
                not address and not _within(serve.shutdown, DELETE_SLACK_S)):
            then = ("the app goes with the local head" if not address else
                    "delete the app with `serve shutdown` once Ray answers")
            click.echo(f"avatard cluster: Ray did not answer within {bound_s:g} s (its "
                       f"processes may have had the signal too): {then}", err=True)
    finally:
        if not _within(ray.shutdown, DELETE_SLACK_S):
            click.echo("avatard cluster: Ray's shutdown did not finish; exiting", err=True)


def _within(call: Any, timeout_s: float) -> bool:
    """Run `call()` on a daemon thread; whether it returned within `timeout_s` (an error
    it raised counts as returned: it is logged, not raised). A call still running is left
    to the interpreter's exit."""
    def run() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - Ray's errors on a head that went away
            click.echo(f"avatard cluster: {type(exc).__name__}: {exc}", err=True)

    thread = threading.Thread(target=run, name="cluster-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def _port_in_use(host: str, port: int) -> str:
    """Why `host:port` cannot take a listener ("" when it can): a test bind, with
    SO_REUSEADDR so that only a live socket there (not one in TIME_WAIT) counts."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return ""  # Serve says what is wrong with the host
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
            probe.listen(1)
        except OSError as exc:
            return exc.strerror or str(exc)
    return ""


def _deploy_within(deploy: Any, config: Any, timeout_s: float, stop: threading.Event) -> None:
    """`deploy(config)` in a thread, waited for up to `timeout_s` (Serve waits as long as
    a replica cannot be placed). Raises ClickException naming what it waited for."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            deploy(config)
        except BaseException as exc:  # shown to the user below
            failure.append(exc)

    worker = threading.Thread(target=run, name="deploy", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive() and time.monotonic() < deadline and not stop.is_set():
        worker.join(0.5)
    if worker.is_alive():
        raise click.ClickException(
            f"the app was not running after {timeout_s:.0f} s "
            f"({'stopped by a signal' if stop.is_set() else 'see --ready-timeout'}): a node "
            "replica needs cluster.gpus_per_node GPUs on some node, and its daemon must "
            "load within cluster.node_ready_timeout_s; `ray status` shows what is free")
    if failure:
        raise click.ClickException(f"deploying failed: {failure[0]}")


@cluster.command("status")
@click.option("--url", help=f"The ingress's address [default: from --config, else {DEFAULT_URL}].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="cluster.toml, for cluster.http_host and http_port.")
@click.option("--json", "as_json", is_flag=True, help="Print /v1/status as JSON.")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds to wait for the ingress.")
def status(url: str | None, config_path: str | None, as_json: bool, timeout_s: float) -> None:
    """Every node of the cluster (its capacity and daemon) from the ingress's /v1/status."""
    import urllib.error
    import urllib.request

    if url is None:
        if config_path:
            config = _config(config_path, ())
            url = f"http://{config.http_host}:{config.http_port}"
        else:
            url = DEFAULT_URL
    target = url.rstrip("/") + "/v1/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{target} answered {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {target} within {timeout_s} s: {exc}") from None
    if as_json:
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    click.echo(f"{body['node_count']} node(s), {body['free_slots']:.0f} free slot(s)")
    for name, deployment in sorted(body["deployments"].items()):
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in deployment["replicas"].items())
        click.echo(f"deployment {name}: {deployment['status']}, replicas: {replicas or 'none'}")
    click.echo(f"{'replica':10} {'node':14} {'daemon pid':>10} {'slots':>5} {'running':>7} "
               f"{'queued':>6} {'free':>5}  state")
    for node in body["nodes"]:
        c, d = node["capacity"], node["daemon"]["daemon"]
        click.echo(f"{node['replica_id']:10} {node['node_id'][:12]:14} {node['daemon_pid']:>10} "
                   f"{c['slots']:>5.0f} {c['running']:>7.0f} {c['queued']:>6.0f} "
                   f"{c['free_slots']:>5.0f}  {d['state']}")
