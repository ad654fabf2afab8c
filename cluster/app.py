"""The Serve application: node deployment + ingress deployment, built from a
`ClusterConfig`, and `deploy` to run it on a Ray cluster that is already up.

Runs in the process that deploys (`avatard cluster up`, a test, the bench); the deployments
themselves run in Ray's worker processes.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from .config import ClusterConfig, load_cluster_config
from .ingress import Ingress, current_ingress, make_api
from .node import Node
from .router import CapacityRouter

NODE_DEPLOYMENT = "Node"
INGRESS_DEPLOYMENT = "Ingress"


def node_options(config: ClusterConfig) -> dict[str, Any]:
    """`serve.deployment` options of the node deployment: one GPU (or a fraction) per
    replica, `max_ongoing_requests` from the daemon's slots, the capacity router with its
    stats period, health checks, drain time, and a fixed count or autoscaling."""
    options: dict[str, Any] = {
        "name": NODE_DEPLOYMENT,
        "ray_actor_options": {"num_gpus": config.gpus_per_node, "num_cpus": 0},
        "max_ongoing_requests": config.max_ongoing(),
        "request_router_config": RequestRouterConfig(
            request_router_class=CapacityRouter,
            request_routing_stats_period_s=config.routing_stats_period_s,
            request_routing_stats_timeout_s=max(1.0, config.routing_stats_period_s * 3),
        ),
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": max(10.0, config.health_check_period_s * 5),
        # The replica's __del__ drains its daemon: give it the drain time and a margin.
        "graceful_shutdown_timeout_s": config.drain_timeout_s + 15,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if config.autoscaling:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=config.min_nodes,
            max_replicas=config.max_nodes,
            initial_replicas=config.min_nodes or 1,
            target_ongoing_requests=config.target_ongoing_requests,
            upscale_delay_s=config.upscale_delay_s,
            downscale_delay_s=config.downscale_delay_s,
            metrics_interval_s=min(1.0, config.look_back_period_s),
            look_back_period_s=config.look_back_period_s,
        )
    else:
        options["num_replicas"] = config.min_nodes
    return options


def ingress_actor_options(config: ClusterConfig) -> dict[str, Any]:
    """Ray actor options of an ingress replica: no CPU reserved (it mostly waits), and the
    custom resource `ingress_resource` when set, which keeps the ingress off GPU nodes
    that may go away (give it to the head: `ray start --head --resources=...`)."""
    options: dict[str, Any] = {"num_cpus": 0}
    if config.ingress_resource:
        options["resources"] = {config.ingress_resource: 0.01}
    return options


def build_app(config: ClusterConfig) -> Any:
    """The bound Serve application (`serve.run` takes it): the ingress with a handle to
    the nodes. Raises `ConfigError` from the node's daemon config."""
    config.node_daemon_config()
    api = make_api(current_ingress)

    @serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.max_ongoing_per_ingress,
        ray_actor_options=ingress_actor_options(config),
    )
    @serve.ingress(api)
    class ClusterIngress(Ingress):
        """The ingress replica (`Ingress`), serving the FastAPI routes of `make_api`."""

        def __init__(self, nodes: Any, cluster_config: ClusterConfig):
            super().__init__(nodes, cluster_config)

    node = serve.deployment(Node, **node_options(config))
    return ClusterIngress.bind(node.bind(config), config)


def deploy(config: ClusterConfig, blocking: bool = False) -> Any:
    """Start Serve's HTTP proxy on `http_host:http_port` and run the application on the
    Ray cluster this process is connected to (`ray.init` first). Returns the ingress's
    handle once every replica is up; raises what Serve raises when a deployment fails."""
    # HeadOnly: one HTTP proxy, on the head; nodes come and go, the address stays.
    serve.start(
        proxy_location="HeadOnly", http_options={"host": config.http_host, "port": config.http_port}
    )
    return serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=blocking)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for a Serve config file or KubeRay's `serveConfigV2`
    (`import_path: avatard.cluster.app:app_builder`): `args` is ``{"config": path of
    cluster.toml, "set": {dotted key: value}}`` (both optional). Serve's own
    `http_options` then say where the proxy listens (`cluster.http_host`/`http_port` are
    for `avatard cluster up` only). Raises `ConfigError` naming the key."""
    unknown = sorted(set(args) - {"config", "set"})
    if unknown:
        from avatard.daemon.config import ConfigError

        raise ConfigError(f"args.{unknown[0]}", "unknown; the builder takes config and set")
    return build_app(load_cluster_config(args.get("config"), dict(args.get("set", {}))))
