"""Worker placement over devices (pure logic, with a simulated device list)."""

from __future__ import annotations

from avatard.daemon.devices import DeviceInfo, cpu_device, discover, has_room, place

GIB = 1 << 30


def _gpus(*free_gib: float) -> list[DeviceInfo]:
    return [DeviceInfo(f"cuda:{i}", i, 80 * GIB, int(f * GIB), "sim") for i, f in
            enumerate(free_gib)]


def test_workers_spread_over_all_gpus_emptiest_first():
    devices = _gpus(20, 70, 50)
    counts: dict[str, int] = {}
    order = []
    for _ in range(6):
        device = place(devices, counts)
        counts[device.name] = counts.get(device.name, 0) + 1
        order.append(device.name)
    # First round goes by free memory (70, 50, 20 GiB free), then it round-robins.
    assert order[:3] == ["cuda:1", "cuda:2", "cuda:0"]
    assert sorted(counts.values()) == [2, 2, 2]


def test_equal_free_memory_breaks_ties_by_index():
    devices = _gpus(40, 40)
    assert place(devices, {}).name == "cuda:0"
    assert place(devices, {"cuda:0": 1}).name == "cuda:1"


def test_room_is_the_memory_the_last_load_used():
    gpu = _gpus(10)[0]
    assert has_room(gpu, 9 * GIB)
    assert not has_room(gpu, 11 * GIB)


def test_cpu_only_machine_places_on_cpu():
    # One device, the CPU. (Two discoveries are never compared whole: each reads the live
    # free memory, which moves while other work runs.)
    [device] = discover("cpu")
    assert device.name == "cpu" and not device.is_gpu
    cpu = cpu_device()
    assert cpu.free_bytes > 0 and not cpu.is_gpu
