"""TCP access control: CURVE keys for tcp:// endpoints, refused and logged otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import zmq.auth
from daemon_harness import free_port, run_daemon

from avatard.daemon.config import ConfigError, load_config
from avatard.engines.fake import expected_frame
from avatard.ipc.client import Client, DaemonUnavailable, FrameEvent


def test_non_loopback_tcp_requires_curve_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"daemon.tcp_endpoint": "tcp://0.0.0.0:7780"})
    assert err.value.key == "daemon.tcp_endpoint" and "CURVE" in str(err.value)
    load_config(None, {"daemon.tcp_endpoint": "tcp://127.0.0.1:7780"})  # loopback is fine
    with pytest.raises(ConfigError) as err:
        load_config(None, {"daemon.curve_secret_key_file": "/nonexistent"})
    assert err.value.key == "daemon.curve_clients_dir"


def test_curve_client_is_served_and_unauthenticated_client_refused(tmp_path):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "client")
    _, stranger_secret = zmq.auth.create_certificates(str(keys), "stranger")
    (allowed / "client.key").write_bytes(open(client_public, "rb").read())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with run_daemon(tmp_path, fake={"width": 16, "height": 16},
                    daemon={"tcp_endpoint": endpoint, "curve_secret_key_file": server_secret,
                            "curve_clients_dir": str(allowed)}) as d:
        with Client(endpoint, timeout_s=10, curve_server_key_file=server_public,
                    curve_client_key_file=client_secret) as c:
            frames = [np.array(e.array) for e in c.speak("Hi there.", seed=2)
                      if isinstance(e, FrameEvent)]
            assert frames and all((f == expected_frame(2, i, 16, 16)).all()
                                  for i, f in enumerate(frames))
        for kwargs in ({}, {"curve_server_key_file": server_public,
                            "curve_client_key_file": stranger_secret}):
            with pytest.raises(DaemonUnavailable):
                Client(endpoint, timeout_s=1.5, **kwargs)
        status = d.wait_for(lambda s: s["jobs"]["refused_clients"] >= 1, 10, "a refusal")
        assert status["jobs"]["refused_clients"] >= 1
        assert "refused a tcp client" in d.log_text()
        # The local socket needs no keys (its file mode is its access control).
        with d.client() as local:
            assert local.health().status == "ready"
