"""avatard on a Ray Serve cluster (docs/cluster.md)."""
