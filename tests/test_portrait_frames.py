"""Frame sizes of portraits, against real daemons: a registration reports its portrait's
frame size, and a portrait whose frames cannot fit the frame slots is refused at
registration (`too_large` naming `rings.frame_slot_bytes`), not by the jobs that name it.

The fake engine's `portrait_size` option renders a registered portrait at its own size, as
Ditto does, so portraits of several sizes meet one slot size in one daemon.
"""

from __future__ import annotations

import io
from hashlib import sha256

import pytest
from daemon_harness import run_daemon
from PIL import Image

from avatard.ipc.client import ClientError, DoneEvent, FrameEvent

# The default rings.frame_slot_bytes holds 512 x 512 x 3 bytes (786432).
SLOT_FRAME = (512, 512)
FAKE = {"portrait_size": True, "width": 32, "height": 32}


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(out, format="PNG")
    return out.getvalue()


def test_a_portrait_too_large_for_a_frame_slot_is_refused_at_registration(tmp_path):
    with run_daemon(tmp_path, fake=FAKE) as d, d.client() as client:
        fits = client.register_avatar(png(*SLOT_FRAME))
        with pytest.raises(ClientError) as caught:
            client.register_avatar(png(640, 480))  # 921600 bytes a frame
        refused = caught.value
        assert (refused.code, refused.field) == ("too_large", "image")
        text = str(refused)
        assert "rings.frame_slot_bytes" in text and "640 x 480" in text
        assert "921600" in text and "786432" in text
        # Nothing was kept of it: a job naming it is refused before it runs.
        with pytest.raises(ClientError) as unknown:
            client.speak("Hi.", avatar=sha256(png(640, 480)).hexdigest()[:32])
        assert unknown.value.code == "not_found"
        # The portrait that fits renders at its own size, and the worker serves on.
        events = list(client.speak("Hi.", avatar=fits, seed=1, send_audio=False))
        shapes = {e.array.shape for e in events if isinstance(e, FrameEvent)}
        assert shapes == {(*SLOT_FRAME[::-1], 3)} and isinstance(events[-1], DoneEvent)
        assert d.status()["avatars"]["count"] == 1
