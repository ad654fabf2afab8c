"""The avatard cluster on a real 3-node Ray cluster on this machine (issue 19).

One head (the Serve controller, HTTP proxy and ingress; no GPU) and two nodes with one
logical GPU each, all on loopback, usage stats off; one node replica per GPU node, each
running a real avatard daemon with the fake engine at a fixed cost per frame. Requests go
through real HTTP. One cluster serves the whole module (it takes ~20 s to start).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import free_port

# conftest.py sets Ray's environment (usage stats off, loopback only) before any module
# imports Ray.
ray = pytest.importorskip("ray", reason="the cluster extra is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from avatard.cluster.app import deploy  # noqa: E402
from avatard.cluster.config import load_cluster_config  # noqa: E402
from avatard.cluster.wire import read_records  # noqa: E402
from avatard.engines.fake import expected_frame  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FRAME_MS = 20  # fixed compute per frame of the fake avatar engine
GPU_NODE_ARGS: dict = {}  # how the fixture started a GPU node (tests add more)
TEXT_LIMIT = 5000  # the nodes' fake TTS refuses longer text
TEXT = "One two three four five six seven eight."  # ~60 frames with the fake TTS


def _render(
    port: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/v1/render",
    method: str = "POST",
    timeout_s: float = 180,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _frames_job(port: int, seed: int, text: str = TEXT) -> dict:
    """One render through HTTP in the `frames` format: checks every record and returns
    {indices, nodes, attempts}; raises AssertionError on a wrong or missing frame."""
    status, headers, body = _render(
        port,
        json.dumps({"text": text, "seed": seed, "format": "frames", "send_audio": False}).encode(),
    )
    assert status == 200, body[:500]
    records = list(read_records(io.BytesIO(body)))
    assert records[0]["type"] == "start" and records[0]["seed"] == seed
    assert records[-1]["type"] == "done", records[-1]
    frames = [r for r in records if r["type"] == "frame"]
    for r in frames:
        h, w, _ = r["shape"]
        array = np.frombuffer(r["data"], np.uint8).reshape(r["shape"])
        np.testing.assert_array_equal(array, expected_frame(seed, r["index"], h, w))
    return {
        "indices": [r["index"] for r in frames],
        "nodes": records[-1]["nodes"],
        "attempts": records[-1]["attempts"],
        "frames": records[-1]["frames"],
    }


def _reference_mp4(port: int, text: str, seed: int, out: Path) -> tuple[int, object]:
    """The job's frame count (from its `frames` stream, each frame checked) and what an
    mp4 of that stream holds when muxed here by `avatard render`'s writer
    (`read_mp4`'s Mp4Info of `out`): what the ingress's mp4 of the same job must hold."""
    import io as _io

    from avatard.daemon.render import Progress, write_job_mp4
    from avatard.engines.mux import read_mp4
    from avatard.ipc.client import AudioEvent, DoneEvent, FrameEvent

    status, _, body = _render(
        port, json.dumps({"text": text, "seed": seed, "format": "frames"}).encode()
    )
    assert status == 200, body[:500]
    records = list(read_records(io.BytesIO(body)))
    start, done = records[0], records[-1]
    assert start["type"] == "start" and done["type"] == "done", (start, done)
    events: list = []
    for r in records[1:-1]:
        if r["type"] == "frame":
            array = np.frombuffer(r["data"], np.uint8).reshape(r["shape"])
            h, w, _ = r["shape"]
            np.testing.assert_array_equal(array, expected_frame(seed, r["index"], h, w))
            events.append(FrameEvent("", r["index"], 0, array))
        elif r["type"] == "audio":
            pcm = np.frombuffer(r["data"], np.float32)
            events.append(AudioEvent("", r["index"], 0, r["sample_rate"], pcm))
    assert [e.index for e in events if isinstance(e, FrameEvent)] == list(range(done["frames"]))
    events.append(DoneEvent("", done["frames"], 0.0, 0.0, 0.0, 1))
    write_job_mp4(iter(events), out, start["fps"], Progress(_io.StringIO(), "reference"))
    return done["frames"], read_mp4(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(ray Cluster, http port, [GPU node handles]) with the app deployed; the GPU node
    list is the module's: tests that add or remove nodes keep it up to date."""
    # A private temp dir: another Ray on this machine keeps its own sessions and address.
    temp_dir = tempfile.mkdtemp(prefix="avd-ray-")
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp_dir}
    ray_cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": {"ingress": 10}, **common},
    )
    GPU_NODE_ARGS.update(num_cpus=1, num_gpus=1, **common)
    gpu_nodes = [ray_cluster.add_node(**GPU_NODE_ARGS) for _ in range(2)]
    ray.init(address=ray_cluster.address, logging_level="warning")
    port = free_port()
    config = load_cluster_config(
        None,
        {
            "cluster.http_port": port,
            "cluster.min_nodes": 2,
            "cluster.max_nodes": 2,
            "cluster.ingress_resource": "ingress",
            "cluster.event_timeout_s": 20.0,
            "cluster.routing_stats_period_s": 0.5,
            "cluster.drain_timeout_s": 10.0,
            "node.daemon.workers": 2,
            "node.daemon.jobs_per_worker": 2,
            "node.daemon.devices": "cpu",
            "node.engines": {
                "avatar": "fake",
                "tts": "fake",
                "asr": "fake",
                # A voice's text limit, as a real TTS has (its max_text_chars).
                "options": {"fake": {"frame_ms": FRAME_MS, "tts_max_text_chars": TEXT_LIMIT}},
            },
        },
    )
    try:
        deploy(config)
        yield ray_cluster, port, gpu_nodes
    finally:
        from ray import serve

        # Delete the app first and wait: each node replica's __del__ drains its daemon.
        # serve.shutdown alone may kill replicas (and with them their daemons) first.
        for name in serve.status().applications:
            serve.delete(name)
        serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_40_concurrent_renders_complete_with_the_right_frames_on_both_nodes(cluster):
    _, port, _ = cluster
    seeds = random.Random(19).sample(range(1, 2**31), 40)
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda s: _frames_job(port, s), seeds))
    for result in results:
        assert result["indices"] == list(range(result["frames"]))
        assert result["frames"] > 20
    used = {node for r in results for node in r["nodes"]}
    assert len(used) == 2, f"all 40 jobs ran on {used}"


def test_an_mp4_render_holds_every_frame_of_the_job_and_decodes(cluster, tmp_path):
    """The ingress encodes an mp4 while its job runs (`StreamingMp4`): the file decodes
    (PyAV), holds every frame of the job (as many as the job's `frames` stream, plus the
    0-3 repeats that cover the audio's AAC padding, exactly as `avatard render`'s writer
    makes them), at the job's fps, with audio as long as the video."""
    from avatard.engines.mux import read_mp4

    _, port, _ = cluster
    text, seed = TEXT * 2, 31
    frames, reference = _reference_mp4(port, text, seed, tmp_path / "reference.mp4")
    status, headers, body = _render(
        port, json.dumps({"text": text, "seed": seed, "format": "mp4"}).encode()
    )
    assert status == 200 and headers["content-type"] == "video/mp4", body[:300]
    out = tmp_path / "cluster.mp4"
    out.write_bytes(body)
    info = read_mp4(out)
    assert frames > 100
    assert frames <= info.frame_count <= frames + 3, (frames, info)
    assert info == reference
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / 25
    import av

    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.video[0].average_rate == 25


def test_an_idempotency_key_replays_instead_of_rendering_again(cluster):
    _, port, _ = cluster
    body = json.dumps({"text": "Once only.", "format": "frames"}).encode()
    key = {"Idempotency-Key": f"test-{time.monotonic_ns()}"}
    first = _render(port, body, key)
    second = _render(port, body, key)
    assert first[0] == second[0] == 200
    assert second[1].get("idempotent-replayed") == "true"
    assert first[2] == second[2]  # same seed (chosen once), same frames
    other = _render(port, json.dumps({"text": "Something else."}).encode(), key)
    assert other[0] == 422 and json.loads(other[2])["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    "path, method, body, status, code, field",
    [
        ("/v1/nothing", "POST", b"{}", 404, "not_found", "path"),
        ("/v1/render", "GET", b"", 405, "method_not_allowed", "method"),
        ("/v1/render", "POST", b"{not json", 400, "bad_json", "body"),
        ("/v1/render", "POST", b"{}", 422, "bad_field", "text"),
        ("/v1/render", "POST", b'{"text": "hi", "seed": -1}', 422, "bad_field", "seed"),
        ("/v1/render", "POST", b'{"text": "hi", "format": "gif"}', 422, "bad_field", "format"),
        ("/v1/render", "POST", b'{"text": "hi", "colour": 1}', 422, "bad_field", "colour"),
        ("/v1/render", "POST", b'{"text": "   "}', 422, "bad_field", "text"),
        ("/v1/render", "POST", b'{"text": "\xff\xfe"}', 400, "bad_json", "body"),
        ("/v1/render", "POST", b'\xff{"text": "hi"}', 400, "bad_json", "body"),
        (
            "/v1/render",
            "POST",
            b'{"text": "' + b"a" * (TEXT_LIMIT + 1) + b'"}',
            422,
            "bad_field",
            "text",
        ),
        ("/v1/render", "POST", b'{"text": "hi", "voice": "nobody"}', 400, "bad_input", "voice"),
        ("/v1/render", "POST", b'{"text": "hi", "deadline_s": 1e-3}', 504, "timeout", "deadline_s"),
        (
            "/v1/render",
            "POST",
            b'{"text": "' + b"a" * (33 * 1024 * 1024) + b'"}',
            413,
            "too_large",
            "body",
        ),
        ("/v1/lipsync?sample_rate=100", "POST", b"\0" * 64, 422, "bad_field", "sample_rate"),
        ("/v1/lipsync?sample_rate=16000", "POST", b"\0" * 6, 422, "bad_field", "body"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(cluster, path, method, body, status, code, field):
    _, port, _ = cluster
    got, _, reply = _render(port, body, path=path, method=method, timeout_s=60)
    assert got == status, reply[:300]
    error = json.loads(reply)["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert error["rule"]
    assert "gave up" not in error["rule"], error  # a request's own fault is not retried


def test_text_at_the_nodes_limit_renders(cluster):
    _, port, _ = cluster
    words = ("word " * (TEXT_LIMIT // 5))[:TEXT_LIMIT]
    body = json.dumps({"text": words, "format": "frames", "send_audio": False})
    status, _, reply = _render(port, body.encode())
    assert status == 200, reply[:300]


def test_a_second_cluster_up_on_the_same_port_is_refused_naming_it(cluster):
    import subprocess
    import sys

    _, port, _ = cluster
    up = subprocess.run(
        [sys.executable, "-m", "avatard.daemon.cli", "cluster", "up"]
        + ["--set", f"cluster.http_port={port}", "--num-gpus", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 1, up.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in up.stderr, up.stderr
    assert "Traceback" not in up.stderr
    assert _status(port)["node_count"] >= 1  # the first cluster still serves


def test_lipsync_mp4_transcribe_and_status(cluster):
    _, port, _ = cluster
    pcm = (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)  # 1 s: 25 frames
    status, headers, body = _render(
        port,
        pcm.tobytes(),
        {"Content-Type": "audio/L32"},
        path="/v1/lipsync?sample_rate=16000&seed=9",
    )
    assert status == 200 and headers["content-type"] == "video/mp4", body[:300]
    from avatard.engines.mux import read_mp4

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"cluster-{os.getpid()}.mp4"
    out.write_bytes(body)
    try:
        assert read_mp4(out).frame_count >= 25
    finally:
        out.unlink()
    status, _, body = _render(port, pcm.tobytes(), path="/v1/transcribe?sample_rate=16000")
    assert status == 200, body[:300]
    assert json.loads(body)["segments"]
    status, _, body = _render(port, b"", path="/v1/status", method="GET")
    assert status == 200, body[:300]
    report = json.loads(body)
    assert report["node_count"] == 2
    assert {n["capacity"]["slots"] for n in report["nodes"]} == {4.0}
    assert len({n["node_id"] for n in report["nodes"]}) == 2
    # The CLI reads the same, as a table naming both nodes.
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "avatard.daemon.cli", "cluster", "status"]
        + ["--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("2 node(s)"), table.stdout
    for node in report["nodes"]:
        assert node["node_id"][:12] in table.stdout


def test_a_node_whose_daemon_is_killed_mid_mp4_render_hands_the_job_on(cluster):
    """kill -9 of one node's daemon mid-render: the node sees its daemon exit and fails
    the call (daemon_gone), the ingress resumes the job on the other node, and the mp4
    comes whole. Serve then replaces the replica (its health check fails)."""
    import signal
    import threading

    from avatard.engines.mux import read_mp4

    _, port, _ = cluster
    got: dict = {}
    body = json.dumps({"text": TEXT * 6, "seed": 11, "format": "mp4"}).encode()
    # Idle first: a node still counted as running an earlier test's job (its figures
    # come with the next routing-stats report) is not the one running this render.
    deadline = time.monotonic() + 60
    while any(n["capacity"]["running"] > 0 for n in _status(port)["nodes"]):
        assert time.monotonic() < deadline, "the nodes were not idle within 60 s"
        time.sleep(0.1)
    render = threading.Thread(target=lambda: got.update(reply=_render(port, body)))
    render.start()
    deadline = time.monotonic() + 60
    while not (busy := [n for n in _status(port)["nodes"] if n["capacity"]["running"] > 0]):
        assert time.monotonic() < deadline, "no node ran the job within 60 s"
        time.sleep(0.1)
    os.kill(busy[0]["daemon_pid"], signal.SIGKILL)
    render.join(240)
    assert not render.is_alive(), "no answer within 240 s"
    status, headers, reply = got["reply"]
    assert status == 200, reply[:300]
    assert headers["x-avatard-attempts"] == "2", headers
    assert len(set(headers["x-avatard-nodes"].split(","))) == 2, headers
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"cluster-kill-{os.getpid()}.mp4"
    reference = out.with_name(f"cluster-kill-ref-{os.getpid()}.mp4")
    out.write_bytes(reply)
    try:
        info = read_mp4(out)
        assert info.frame_count > 300  # ~360 frames of TEXT * 6
        _two_nodes_serving(cluster)
        # The frames the first node sent were encoded once, and the second node's went on
        # in the same file: the same file as from one node, no frame lost or doubled.
        frames, expected = _reference_mp4(port, TEXT * 6, 11, reference)
        assert frames <= info.frame_count <= frames + 3, (frames, info)
        assert info == expected
    finally:
        out.unlink()
        reference.unlink(missing_ok=True)


def test_a_node_removed_mid_run_loses_no_frame_and_duplicates_none(cluster):
    """It takes a node away (later tests add one back)."""
    ray_cluster, port, gpu_nodes = cluster
    seeds = random.Random(20).sample(range(1, 2**31), 16)
    victim = gpu_nodes[0]
    with ThreadPoolExecutor(16) as pool:
        # Jobs of ~120 frames (2.4 s of compute each): the node stays busy a while.
        futures = [pool.submit(_frames_job, port, seed, TEXT * 2) for seed in seeds]
        deadline = time.monotonic() + 60
        while True:  # until the node to remove is running jobs
            nodes = {n["node_id"]: n for n in _status(port)["nodes"]}
            if nodes.get(victim.node_id, {}).get("capacity", {}).get("running", 0) > 0:
                break
            assert time.monotonic() < deadline, f"node {victim.node_id} ran no job in 60 s"
            time.sleep(0.2)
        gpu_nodes.remove(victim)
        ray_cluster.remove_node(victim, allow_graceful=False)
        results = [f.result(timeout=240) for f in futures]
    for result in results:
        # _frames_job checked every frame's pixels; exactly once and in order:
        assert result["indices"] == list(range(result["frames"]))
    # The jobs the removed node was running went on elsewhere (a job retried for another
    # reason, e.g. a busy survivor, may have run on one node only: not counted here).
    moved = [r for r in results if victim.node_id in r["nodes"] and r["attempts"] > 1]
    assert moved, "no job was running on the removed node"
    assert all(len(set(r["nodes"])) >= 2 for r in moved), moved
    # The removed node's daemon died with it (Ray ended the node's processes) and left
    # its segments in the /dev/shm all nodes share here; a new node's daemon sweeps them.
    _two_nodes_serving(cluster)


def _status(port: int) -> dict:
    status, _, body = _render(port, b"", path="/v1/status", method="GET", timeout_s=60)
    assert status == 200, body[:300]
    return json.loads(body)


def _two_nodes_serving(cluster) -> None:
    """Give the cluster two GPU nodes again (an earlier test may have removed one) and
    wait, at most 120 s, until two node replicas answer /v1/status."""
    ray_cluster, port, gpu_nodes = cluster
    while len(gpu_nodes) < 2:
        gpu_nodes.append(ray_cluster.add_node(**GPU_NODE_ARGS))
    deadline = time.monotonic() + 120
    while (count := _status(port)["node_count"]) < 2:
        assert time.monotonic() < deadline, f"{count} node replica(s) after 120 s, wanted 2"
        time.sleep(1.0)


class LiveClient:
    """A WebSocket client of /v1/live that keeps every message it read, in order:
    JSON ones as dicts, media as `parse_live_media` dicts."""

    def __init__(self, port: int):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}/v1/live", open_timeout=60, max_size=2**24)
        self.log: list[dict] = []

    def send(self, kind: str, **fields) -> None:
        self.ws.send(json.dumps({"type": kind, **fields}))

    def send_audio(self, segment_id: str, pcm: np.ndarray, rate: int = 16000) -> None:
        self.send("live_audio", segment_id=segment_id, sample_rate=rate)
        self.ws.send(pcm.astype(np.float32).tobytes())

    def read_until(self, pred, what: str, timeout_s: float = 60.0) -> dict:
        """Read until a message for which pred(msg) holds (media have `kind`, JSON
        messages `type`); AssertionError naming `what` after timeout_s."""
        from avatard.cluster.wire import parse_live_media

        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout_s} s; last: {self.log[-3:]}"
            raw = self.ws.recv(timeout=left)
            msg = parse_live_media(raw) if isinstance(raw, bytes) else json.loads(raw)
            self.log.append(msg)
            if pred(msg):
                return msg

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.log if m.get("type") == kind or m.get("kind") == kind]


@pytest.mark.parametrize(
    "first, code, field",
    [
        ('{"type": "live_open", "prebuffer_ms": 9000}', "bad_message", "prebuffer_ms"),
        ('{"type": "live_open", "colour": 1}', "bad_message", "colour"),
        ('{"type": "live_end", "segment_id": "a"}', "bad_message", "type"),
        ('{"type": "live_shout"}', "bad_message", "type"),
        ("{not json", "bad_json", "message"),
    ],
)
def test_a_bad_first_live_message_gets_an_error_naming_the_field(cluster, first, code, field):
    _, port, _ = cluster
    client = LiveClient(port)
    try:
        client.ws.send(first)
        error = client.read_until(lambda m: True, "the error")
    finally:
        client.ws.close()
    assert (error["type"], error["code"], error["field"]) == ("error", code, field), error
    assert error["rule"]


def test_a_live_error_gives_back_the_req_id_only_when_the_message_had_one(cluster):
    _, port, _ = cluster
    client = LiveClient(port)
    try:
        client.send("live_open", seed=3)
        accepted = client.read_until(lambda m: True, "the first message")
        assert accepted["type"] == "accepted", accepted
        client.send("live_end")  # no segment_id, no req_id
        plain = client.read_until(lambda m: m.get("type") == "error", "the first error")
        client.send("live_end", req_id=7)
        tagged = client.read_until(lambda m: m.get("type") == "error", "the second error")
        client.send("live_close")
        client.read_until(lambda m: m.get("type") in ("done", "failed"), "done")
    finally:
        client.ws.close()
    assert (plain["code"], plain["field"]) == ("bad_message", "segment_id"), plain
    assert "req_id" not in plain, plain
    assert (tagged["field"], tagged["req_id"]) == ("segment_id", 7), tagged


def test_a_live_session_over_the_websocket_survives_the_removal_of_its_node(cluster):
    from avatard.engines.fake import frame_audio_level_of, frame_index_of

    ray_cluster, port, gpu_nodes = cluster
    _two_nodes_serving(cluster)
    speech = (0.5 * np.sin(np.arange(16000 * 4) * 0.07)).astype(np.float32)  # 4 s
    client = LiveClient(port)
    try:
        client.send("live_open", seed=5)
        accepted = client.read_until(lambda m: True, "the first message")
        assert accepted["type"] == "accepted", accepted
        first_node = accepted["node_id"]
        for chunk in np.split(speech, 8):
            client.send_audio("a", chunk)
        client.send("live_end", segment_id="a")
        client.read_until(lambda m: m.get("type") == "playback_started", "playback_started a")
        client.read_until(lambda m: m.get("kind") == "frame", "a frame of a")  # it plays
        (node,) = [n for n in gpu_nodes if n.node_id == first_node]
        gpu_nodes.remove(node)
        ray_cluster.remove_node(node, allow_graceful=False)
        moved = client.read_until(lambda m: m.get("type") == "session_moved", "session_moved")
        # The segment that was playing ended, interrupted, before the move was told.
        finished_a = client.of("playback_finished")
        assert [m["segment_id"] for m in finished_a] == ["a"]
        assert finished_a[0]["interrupted"] is True
        # Input naming a segment from before the move is refused; new speech plays.
        client.send_audio("a", speech[:1600])
        client.read_until(lambda m: m.get("type") == "input_refused", "input_refused for a")
        client.send_audio("b", speech[:16000])
        client.send("live_end", segment_id="b")
        client.read_until(
            lambda m: m.get("type") == "playback_finished" and m["segment_id"] == "b",
            "playback_finished b",
        )
        client.send("live_close")
        done = client.read_until(lambda m: m.get("type") in ("done", "failed"), "done")
    finally:
        client.ws.close()
    # The removed node's daemon may die with its node before it unlinks its segments;
    # here, unlike on a lost machine, they stay in the /dev/shm all nodes share until
    # a daemon starts and sweeps dead owners' segments: the replacement node's does.
    _two_nodes_serving(cluster)
    assert done["type"] == "done", done
    refused = client.of("input_refused")[0]
    assert (refused["code"], refused["field"]) == ("bad_input", "segment_id")
    assert len(set(done["nodes"])) == 2 and done["nodes"][0] == first_node
    assert done["attempts"] == 2
    # Every started segment finished; b played to its end after the move.
    started = [m["segment_id"] for m in client.of("playback_started")]
    finished = {m["segment_id"]: m for m in client.of("playback_finished")}
    assert started == ["a", "b"] and set(finished) == {"a", "b"}
    assert finished["b"]["interrupted"] is False
    assert finished["b"]["position_s"] == pytest.approx(1.0, abs=0.05)
    # Frames: indices rise, the gap of the move is frames_lost, each frame is the one
    # its node made for that index (the new node counts from the resume index).
    frames = client.of("frame")
    indices = [f["index"] for f in frames]
    assert indices == sorted(set(indices))
    before = [f for f in frames if f["index"] < moved["resume_index"]]
    after = [f for f in frames if f["index"] >= moved["resume_index"]]
    assert before and after and after[0]["index"] == moved["resume_index"]
    assert moved["resume_index"] - (before[-1]["index"] + 1) == moved["frames_lost"]
    assert done["frames_lost"] >= moved["frames_lost"]
    for f in before:
        assert frame_index_of(f["array"]) == f["index"]
    for f in after:
        assert frame_index_of(f["array"]) == f["index"] - moved["resume_index"]
    # Audio k plays with frame k (the node may die between the last frame it sent and
    # that frame's audio); b's speech came out after the move (loud frames).
    audio_indices = {a["index"] for a in client.of("audio")}
    assert audio_indices <= set(indices)
    assert set(indices) - audio_indices <= {before[-1]["index"]}
    assert any(frame_audio_level_of(f["array"]) > 0 for f in after)
    assert done["frames"] == len(frames)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_live_sessions_past_the_free_slots_are_refused_busy_naming_the_limit(cluster):
    """As many live sessions as the nodes have slots open and run (frames come, nothing
    waits in a daemon's queue); one more is refused `failed` `busy` naming the limit, and
    no running session is told `session_moved` (its node was not lost)."""
    _, port, _ = cluster
    _two_nodes_serving(cluster)
    deadline = time.monotonic() + 120
    while True:  # earlier tests' jobs and sessions are gone
        report = _status(port)
        slots = sum(n["capacity"]["slots"] for n in report["nodes"])
        if report["free_slots"] == slots and slots > 0:
            break
        assert time.monotonic() < deadline, f"the nodes were not idle within 120 s: {report}"
        time.sleep(0.5)
    clients: list[LiveClient] = []
    try:
        for i in range(int(slots)):
            clients.append(LiveClient(port))
            clients[-1].send("live_open", seed=100 + i)
            accepted = clients[-1].read_until(lambda m: True, f"the answer to session {i}")
            assert accepted["type"] == "accepted", accepted
        for client in clients:
            client.read_until(lambda m: m.get("kind") == "frame", "a frame")
        extra = LiveClient(port)
        clients.append(extra)
        extra.send("live_open", seed=999)
        refused = extra.read_until(lambda m: True, "the answer past the slots")
        assert (refused["type"], refused.get("code")) == ("failed", "busy"), refused
        assert "no node has a free slot for a live session" in refused["message"], refused
        assert "node.daemon.jobs_per_worker" in refused["message"], refused
        for client in clients[:-1]:
            client.read_until(lambda m: m.get("kind") == "frame", "a frame after the refusal")
            assert not client.of("session_moved") and not client.of("failed"), client.log[-3:]
    finally:
        for client in clients:
            client.ws.close()


def test_autoscaling_adds_a_node_under_load_and_drains_it_when_idle(cluster):
    """Last in the module: it redeploys the app with autoscaling between 1 and 2 nodes."""
    import threading

    from ray import serve

    _, port, _ = cluster
    _two_nodes_serving(cluster)  # two GPU nodes for Serve to place replicas on
    config = load_cluster_config(
        None,
        {
            "cluster.http_port": port,
            "cluster.min_nodes": 1,
            "cluster.max_nodes": 2,
            "cluster.target_ongoing_requests": 2.0,
            "cluster.upscale_delay_s": 1.0,
            "cluster.downscale_delay_s": 2.0,
            "cluster.look_back_period_s": 2.0,
            "cluster.ingress_resource": "ingress",
            "cluster.event_timeout_s": 20.0,
            "cluster.routing_stats_period_s": 0.5,
            "cluster.drain_timeout_s": 10.0,
            "node.daemon.workers": 2,
            "node.daemon.jobs_per_worker": 2,
            "node.daemon.devices": "cpu",
            "node.engines": {
                "avatar": "fake",
                "tts": "fake",
                "asr": "fake",
                # A voice's text limit, as a real TTS has (its max_text_chars).
                "options": {"fake": {"frame_ms": FRAME_MS, "tts_max_text_chars": TEXT_LIMIT}},
            },
        },
    )
    serve.delete(config.app_name)
    deploy(config)
    assert _status(port)["node_count"] == 1
    # Load: 8 clients render back to back until a second node has served some jobs.
    stop = threading.Event()
    results: list[dict] = []
    seeds = iter(random.Random(21).sample(range(1, 2**31), 10_000))
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            with lock:
                seed = next(seeds)
            results.append(_frames_job(port, seed))

    two = None
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client) for _ in range(8)]
        try:
            deadline = time.monotonic() + 120
            while two is None or len({n for r in results for n in r["nodes"]}) < 2:
                assert time.monotonic() < deadline, "no second node served a job within 120 s"
                assert not any(f.done() for f in futures), [f.exception() for f in futures]
                report = _status(port)
                if report["node_count"] == 2:
                    two = report
                time.sleep(1.0)
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=120)
    pids = {n["replica_id"]: n["daemon_pid"] for n in two["nodes"]}
    # Idle: Serve removes one node after downscale_delay_s; it drains (Serve waits for
    # its ongoing requests, then its daemon gets SIGTERM) and its daemon exits.
    deadline = time.monotonic() + 120
    while (report := _status(port))["node_count"] != 1 or len(
        [pid for pid in pids.values() if _pid_alive(pid)]
    ) != 1:
        assert time.monotonic() < deadline, f"not back to one node after 120 s: {report}"
        time.sleep(1.0)
    (left,) = report["nodes"]
    assert left["replica_id"] in pids and _pid_alive(left["daemon_pid"])
    # Every job completed on its first node: scale-down stopped no running job.
    assert len(results) >= 8
    for result in results:
        assert result["indices"] == list(range(result["frames"]))
        assert result["attempts"] == 1, result
