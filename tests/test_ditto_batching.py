"""Dynamic batching of Ditto's per-frame work across streams, and its CUDA-graph wrapper."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avatard.engines.base import EngineInputError  # noqa: E402
from avatard.engines.ditto.batcher import Batcher, BatcherClosed, drain_futures  # noqa: E402
from avatard.engines.ditto.engine import DittoEngine  # noqa: E402
from avatard.engines.ditto.graphs import GraphedCall  # noqa: E402


def _recording_batcher(max_items: int, max_wait_s: float):
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [i * 10 for i in items]

    return Batcher("test", run, max_items, max_wait_s), batches


def test_items_from_many_threads_share_batches_and_keep_their_order() -> None:
    # A long wait: the batch thread holds the first items until 4 are pending.
    batcher, batches = _recording_batcher(max_items=4, max_wait_s=5.0)
    results: dict[str, list[int]] = {}
    start = threading.Barrier(2)

    def stream(name: str, base: int) -> None:
        start.wait(timeout=10)
        futures = batcher.submit([base, base + 1])
        results[name] = list(drain_futures(futures, 10, name))

    threads = [threading.Thread(target=stream, args=(n, b)) for n, b in (("a", 0), ("b", 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    batcher.close()
    assert results == {"a": [0, 10], "b": [1000, 1010]}
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1, 100, 101]
    assert batcher.mean_batch == 4


def test_a_lone_item_runs_after_the_bounded_wait() -> None:
    batcher, batches = _recording_batcher(max_items=8, max_wait_s=0.01)
    assert batcher.run_now([7]) == [70]
    assert batches == [[7]]
    # More items than a batch holds are split, oldest first.
    assert batcher.run_now(list(range(20))) == [i * 10 for i in range(20)]
    assert [len(b) for b in batches[1:]] == [8, 8, 4]
    batcher.close()


def test_earliest_deadline_runs_first_and_a_cut_makes_a_batch_of_one() -> None:
    gate = threading.Event()
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        gate.wait(timeout=10)  # hold the thread on the first batch while the rest queue
        batches.append(list(items))
        return items

    batcher = Batcher("test", run, max_items=3, max_wait_s=0.0)
    first = batcher.submit(["blocker"])
    deadline = time.monotonic() + 10
    while not first[0].running() and time.monotonic() < deadline:
        time.sleep(0.001)  # until the batch thread has taken the blocker
    # An old stream's later frames, then a new stream whose first frame is due sooner.
    old = batcher.submit(["old5", "old6", "old7"], deadlines=[5.0, 6.0, 7.0])
    new = batcher.submit(["new1", "new2"], deadlines=[1.0, 2.0], cut_after_first=True)
    gate.set()
    for fut in first + old + new:
        fut.result(timeout=10)
    batcher.close()
    assert batches == [["blocker"], ["new1"], ["new2", "old5", "old6"], ["old7"]]


def test_holders_wait_for_the_other_holders_of_their_round_and_no_longer() -> None:
    """hold_s: an item of a holder waits (here up to 60 s: only company ends the wait)
    while another holder that submitted within holder_ttl_s has no item pending, and runs
    as soon as that item comes; a holder that is the only one of its round, or whose
    peers went quiet for longer than holder_ttl_s, runs at once, whatever its deadline;
    an item with no holder runs after max_wait_s and ends a holder's wait. No timing is
    asserted: a wrongly held item would wait 60 s and miss the 20 s result timeout."""
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        batches.append(list(items))
        return items

    batcher = Batcher("hold", run, max_items=4, max_wait_s=0.001, hold_s=60.0,
                      holder_ttl_s=3.0)
    try:
        far = time.monotonic() + 3600
        # The first round of holder "a": nobody else is known, so no wait.
        assert batcher.submit(["a1"], [far], holder="a")[0].result(timeout=20) == "a1"
        # "b" joins: "a" submitted within holder_ttl_s, so b1 waits for a2 (far past
        # max_wait_s), then both run together.
        b1 = batcher.submit(["b1"], [far], holder="b")[0]
        time.sleep(0.05)
        a2 = batcher.submit(["a2"], [far], holder="a")[0]
        assert (b1.result(timeout=20), a2.result(timeout=20)) == ("b1", "a2")
        # An item due now waits for its round too: the round, not the deadline, ends it.
        a3 = batcher.submit(["a3"], [time.monotonic()], holder="a")[0]
        time.sleep(0.05)
        b3 = batcher.submit(["b3"], [time.monotonic()], holder="b")[0]
        assert (a3.result(timeout=20), b3.result(timeout=20)) == ("a3", "b3")
        # No holder: runs after max_wait_s however far its deadline, and takes a waiting
        # holder's item with it (never held back itself).
        assert batcher.submit(["batch"], [far])[0].result(timeout=20) == "batch"
        a4 = batcher.submit(["a4"], [far], holder="a")[0]
        time.sleep(0.05)  # a4 waits for b's next window
        assert batcher.submit(["batch2"], [far])[0].result(timeout=20) == "batch2"
        assert a4.result(timeout=20) == "a4"
        assert batches == [["a1"], ["b1", "a2"], ["a3", "b3"], ["batch"], ["a4", "batch2"]]
        with pytest.raises(ValueError, match="hold_s"):
            Batcher("bad", run, 1, 0.0, hold_s=-1)
    finally:
        batcher.close()

    # A holder that went quiet for longer than holder_ttl_s is no longer waited for.
    batches.clear()
    batcher = Batcher("hold", run, max_items=4, max_wait_s=0.001, hold_s=60.0,
                      holder_ttl_s=0.2)
    try:
        assert batcher.submit(["x1"], holder="x")[0].result(timeout=20) == "x1"
        time.sleep(0.5)  # "x" closed, say
        assert batcher.submit(["y1"], holder="y")[0].result(timeout=20) == "y1"
        assert batches == [["x1"], ["y1"]]
    finally:
        batcher.close()


def test_a_failing_batch_fails_each_of_its_items_and_the_batcher_goes_on() -> None:
    calls = {"n": 0}

    def run(items: list[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fault")
        return items

    batcher = Batcher("test", run, max_items=4, max_wait_s=0.0)
    futures = batcher.submit([1])
    with pytest.raises(RuntimeError, match="device fault"):
        futures[0].result(timeout=10)
    assert batcher.run_now([5]) == [5]
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit([1])


def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    batcher = Batcher("test", lambda items: items[:-1], max_items=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="gave 1 results"):
        batcher.run_now([1, 2])
    batcher.close()


def test_batcher_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_items"):
        Batcher("x", lambda i: i, 0, 0.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher("x", lambda i: i, 1, -1.0)
    batcher = Batcher("x", lambda i: i, 1, 0.0)
    with pytest.raises(ValueError, match="2 items but 1 deadlines"):
        batcher.submit([1, 2], deadlines=[0.0])
    batcher.close()


def test_two_stage_batches_launch_ahead_and_complete_in_order() -> None:
    # `run` launches (returns a handle), `finish` waits for it. The batch thread must
    # launch the next batch while an earlier one still waits in `finish`, keep at most
    # `in_flight` launched batches unfinished, and deliver each item's own result.
    release = threading.Event()
    launched: list[list[int]] = []
    unfinished = {"now": 0, "max": 0}
    lock = threading.Lock()

    def launch(items: list[int]) -> list[int]:
        with lock:
            launched.append(list(items))
            unfinished["now"] += 1
            unfinished["max"] = max(unfinished["max"], unfinished["now"])
        return list(items)

    def finish(handle: list[int]) -> list[int]:
        release.wait(timeout=10)
        with lock:
            unfinished["now"] -= 1
        return [i * 10 for i in handle]

    batcher = Batcher("test", launch, max_items=2, max_wait_s=0.0, finish=finish, in_flight=2)
    futures = batcher.submit(list(range(8)))
    deadline = time.monotonic() + 10
    while len(launched) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the semaphore must hold the third launch back meanwhile
    assert len(launched) == 2 and not any(f.done() for f in futures)
    release.set()
    assert list(drain_futures(futures, 10, "item")) == [i * 10 for i in range(8)]
    assert unfinished["max"] == 2
    assert batcher.batches == 4 and batcher.mean_batch == 2
    batcher.close()


def test_two_stage_failures_reach_every_item_of_their_batch() -> None:
    def launch(items: list[int]) -> list[int]:
        if 1 in items:
            raise RuntimeError("launch fault")
        return items

    def finish(handle: list[int]) -> list[int]:
        if 2 in handle:
            raise RuntimeError("copy fault")
        return handle if 3 not in handle else handle[:-1]

    batcher = Batcher("test", launch, max_items=1, max_wait_s=0.0, finish=finish)
    futures = batcher.submit([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="launch fault"):
        futures[0].result(timeout=10)
    with pytest.raises(RuntimeError, match="copy fault"):
        futures[1].result(timeout=10)
    with pytest.raises(RuntimeError, match="gave 0 results"):
        futures[2].result(timeout=10)
    assert futures[3].result(timeout=10) == 4
    batcher.close()


def test_closing_a_two_stage_batcher_completes_what_was_launched() -> None:
    def finish(handle: list[int]) -> list[int]:
        time.sleep(0.05)
        return handle

    batcher = Batcher("test", lambda items: items, max_items=1, max_wait_s=0.0, finish=finish)
    futures = batcher.submit([1, 2, 3])
    batcher.close(timeout_s=10)
    assert [f.result(timeout=0) for f in futures] == [1, 2, 3]
    assert not batcher._thread.is_alive() and not batcher._completer.is_alive()


def test_graphed_call_without_cuda_calls_the_function() -> None:
    seen = []

    def fn(a: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape)
        return a * 2

    call = GraphedCall("x", fn, enabled=True)
    assert torch.equal(call(torch.ones(3)), torch.full((3,), 2.0))
    assert seen == [(3,)] and call.captured == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_call_replays_per_shape_on_cuda() -> None:
    weight = torch.randn(16, 16, device="cuda")
    call = GraphedCall("mm", lambda x: torch.relu(x @ weight), enabled=True)
    for rows in (1, 4, 1):
        x = torch.randn(rows, 16, device="cuda")
        assert torch.allclose(call(x), torch.relu(x @ weight))
    assert call.captured == 2


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("max_batch", 0, "max_batch: must be in 1..64"),
        ("max_batch", 2.5, "max_batch: must be an integer"),
        ("batch_wait_ms", 1000, "batch_wait_ms: must be a number in 0..100"),
        ("cuda_graphs", "yes", "cuda_graphs: must be true or false"),
        ("sampling_timesteps", 0, "sampling_timesteps: must be in 1..1000"),
    ],
)
def test_engine_options_name_the_field_and_limit(option: str, value: object, needle: str) -> None:
    with pytest.raises(EngineInputError) as info:
        DittoEngine("cpu", {"weights": "random", option: value, "warmup": False})
    assert needle in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_frames_of_two_avatars_batched_together_match_frames_rendered_alone() -> None:
    """Cross-stream batching must not change what a stream renders: two avatars' frames
    in one warp + decode batch equal the frames each gets in a batch of its own."""
    engine = DittoEngine(
        "cpu",
        {"weights": "random", "seed": 1, "sampling_timesteps": 2, "max_batch": 4,
         "batch_wait_ms": 100, "warmup": False},
    )
    rng = np.random.default_rng(2)
    states = [
        engine.register(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)),
        engine.register(rng.integers(0, 256, size=(72, 72, 3), dtype=np.uint8)),
    ]
    avatars = [s.payload for s in states]
    x_d = [a.x_s + rng.normal(0, 0.02, size=(1, 21, 3)).astype(np.float32) for a in avatars]
    alone = [engine.render(a, x) for a, x in zip(avatars, x_d, strict=True)]
    before = engine._frame_batcher.batches
    # Submitted back to back within the 100 ms wait: one batch of two avatars.
    futures = [engine.submit_frames(a, x)[0] for a, x in zip(avatars, x_d, strict=True)]
    together = list(drain_futures(futures, 300, "frame"))
    assert engine._frame_batcher.batches == before + 1
    # The counters the worker sends with its heartbeats: 2 frames alone, 2 together, and
    # no padding on a CPU (no captured batch sizes).
    counters = engine.counters()
    assert (counters["frame_batches"], counters["frames"], counters["frames_padded"]) == (
        before + 1, 4, 0)
    for a, b in zip(alone, together, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    source = states[0].payload.image
    assert not np.array_equal(together[0][20:60, 30:70], source[20:60, 30:70])
    engine.close()


def test_batch_buckets_pad_with_the_last_row() -> None:
    from avatard.engines.ditto.engine import _bucket, _pad, _powers_of_two

    assert _powers_of_two(16) == [1, 2, 4, 8, 16]
    assert _powers_of_two(12) == [1, 2, 4, 8, 12]
    assert _powers_of_two(1) == [1]
    assert [_bucket(n, [1, 2, 4, 8, 12]) for n in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12, 13]
    t = torch.arange(6.0).reshape(3, 2)
    padded = _pad(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[3:], t[-1:].expand(2, 2))
    assert _pad(t, 3) is t


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_windows_of_both_modes_batched_together_match_windows_sampled_alone() -> None:
    """LMDM windows of many streams share a DDIM batch (online mode runs a window per 10
    frames); windows with different step counts (offline and online streams) in one
    batch are split by count and each equals the window sampled alone."""
    engine = DittoEngine(
        "cpu",
        {"weights": "random", "seed": 1, "sampling_timesteps": 3, "max_windows": 4,
         "warmup": False},
    )
    try:
        rng = np.random.default_rng(5)
        seq, dim = engine.lmdm.seq_frames, engine.lmdm.motion_feat_dim

        def item(steps: int) -> tuple[np.ndarray, ...]:
            return (rng.normal(size=dim).astype(np.float32),
                    rng.normal(size=(seq, engine.condition_dim)).astype(np.float32),
                    rng.normal(size=(seq, dim)).astype(np.float32),
                    rng.normal(size=(steps - 1, seq, dim)).astype(np.float32))

        items = [item(3), item(2), item(3)]
        together = engine._sample_items(items)
        for one, window in zip(items, together, strict=True):
            alone = engine._sample_items([one])[0]
            assert window.shape == (seq, dim)
            np.testing.assert_allclose(window, alone, rtol=1e-4, atol=1e-4)
        assert engine.pipeline("online").motion.overlap == 70
        assert engine.pipeline("offline").sampling_timesteps == 3  # the option wins
    finally:
        engine.close()
