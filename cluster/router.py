"""Routing by capacity: a Ray Serve request router for the node deployment.

Runs inside every process that holds a handle to the nodes (the ingress replicas), one
instance per handle, on Serve's router event loop. It only ranks replicas; Serve's base
`RequestRouter` then probes the queue length of the replicas of the first rank, skips any
at `max_ongoing_requests`, and sends the request to the least loaded one (backing off and
retrying while every replica is full). So the policy is Serve's power-of-two on ongoing
requests, restricted to the nodes whose daemons report free slots:

1. nodes whose daemon serves and has free slots, most free first, in ranks of equal free
   slots. Free slots = the daemon's slots (`record_routing_stats`, every
   `routing_stats_period_s`) less the requests the node holds, as Serve's queue-length
   cache of this router knows them (updated on every request sent, so a burst of
   requests does not all see the same stale stats); the daemon's own running + queued
   count when the cache has no fresh entry;
2. nodes that report none free (their daemon queues the job), or no stats yet;
3. nodes the request asked to avoid, used only when nothing else is left: `avoid_nodes`
   (Ray node ids where an earlier attempt of the job died or was refused),
   `avoid_replicas` (Serve replica ids) and `avoid_actors` (Ray actor ids in hex: what
   Ray's `RayActorError.actor_id` names when a replica died before it said where it
   runs).

A request with the `target_replica` keyword (a replica id) goes to that replica only: a
live session's inputs go to the replica running it, and `GET /v1/status` asks every
node. While that replica is gone Serve keeps retrying with backoff, so every such call is
bounded by a timeout in the caller.

The routing keywords are arguments of the node's methods (which ignore them): Serve shows
a router the request's arguments, and nothing else of the caller.
"""

from __future__ import annotations

from itertools import groupby

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rank_by_capacity(
    candidates: list[RunningReplica],
    avoid_nodes: frozenset[str],
    avoid_replicas: frozenset[str] = frozenset(),
    avoid_actors: frozenset[str] = frozenset(),
    ongoing: dict[str, int] | None = None,
) -> list[list[RunningReplica]]:
    """The ranks described in the module docstring, best first (no empty rank).
    `candidates` carry `routing_stats` ({"free_slots", "ready", ...}: floats), `node_id`,
    `replica_id` and `actor_id`; `avoid_nodes` holds Ray node ids, `avoid_replicas`
    replica ids, `avoid_actors` actor ids in hex; `ongoing`: requests each replica holds
    (by replica id), where known."""

    def avoid(replica: RunningReplica) -> bool:
        return (
            replica.node_id in avoid_nodes
            or replica.replica_id.unique_id in avoid_replicas
            or (bool(avoid_actors) and replica.actor_id.hex() in avoid_actors)
        )

    avoided = [r for r in candidates if avoid(r)]
    others = [r for r in candidates if not avoid(r)]

    def free(replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        if not stats.get("ready", 0.0):
            return 0.0
        held = (ongoing or {}).get(replica.replica_id.unique_id)
        if held is None:
            return stats.get("free_slots", 0.0)
        return stats.get("slots", 0.0) - held

    with_room = sorted((r for r in others if free(r) > 0), key=free, reverse=True)
    ranks = [list(group) for _, group in groupby(with_room, key=free)]
    ranks.append([r for r in others if free(r) <= 0])
    ranks.append(avoided)
    return [rank for rank in ranks if rank]


class CapacityRouter(RequestRouter):
    """Serve `RequestRouter` ranking node replicas by the free slots their daemons report
    (`rank_by_capacity`); see the module docstring."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target = kwargs.get("target_replica")
        if target:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [chosen] if chosen else []
        return rank_by_capacity(
            candidate_replicas,
            frozenset(kwargs.get("avoid_nodes", ())),
            frozenset(kwargs.get("avoid_replicas", ())),
            frozenset(kwargs.get("avoid_actors", ())),
            self._ongoing(candidate_replicas),
        )

    def _ongoing(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Requests each replica holds, from Serve's queue-length cache (fresh entries)."""
        cache = self.replica_queue_len_cache
        held = {}
        for replica in replicas:
            count = cache.get(replica.replica_id)
            if count is not None:
                held[replica.replica_id.unique_id] = count
        return held
