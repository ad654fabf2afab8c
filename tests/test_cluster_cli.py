"""`avatard cluster up` refuses a bad cluster.toml before it starts anything: exit 78
(EX_CONFIG) and a message naming the key; `avatard cluster status` says which address it
could not read. No Ray is started here (the running cluster's status is checked in
test_cluster.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemon_harness import free_port

pytest.importorskip("ray", reason="the cluster extra is not installed")


def _avatard(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avatard.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[cluster]\nmax_nodez = 2\n", "cluster.max_nodez"),
        ('[cluster]\nmax_nodes = "two"\n', "cluster.max_nodes"),
        ("[cluster]\nmin_nodes = 3\nmax_nodes = 2\n", "cluster.max_nodes"),
        ("[cluster]\ngpus_per_node = 1.5\n", "cluster.gpus_per_node"),
        ("[cluster]\nlive_event_timeout_s = 0\n", "cluster.live_event_timeout_s"),
        ("[cluster]\nhttp_port = 70000\n", "cluster.http_port"),
        ('[node.daemon]\nruntime_dir = "/tmp/x"\n', "node.daemon.runtime_dir"),
        ("[node.daemon]\nworkers = 0\n", "node.daemon.workers"),
        ("[nodes]\n", "nodes"),
        ("[cluster\n", "file"),
    ],
)
def test_cluster_up_refuses_a_bad_config_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "cluster.toml"
    path.write_text(toml)
    result = _avatard("cluster", "up", "--config", str(path))
    assert result.returncode == 78, result.stderr
    assert f"bad config: {key}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_up_refuses_a_missing_file_and_a_bad_override(tmp_path):
    result = _avatard("cluster", "up", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 78 and "bad config: file" in result.stderr, result.stderr
    result = _avatard("cluster", "up", "--set", "cluster.max_attempts=0")
    assert result.returncode == 78 and "cluster.max_attempts" in result.stderr, result.stderr


def test_cluster_status_names_the_address_it_could_not_read():
    url = f"http://127.0.0.1:{free_port()}"
    result = _avatard("cluster", "status", "--url", url, "--timeout", "5")
    assert result.returncode == 1, result.stderr
    assert f"cannot read {url}/v1/status" in result.stderr, result.stderr
