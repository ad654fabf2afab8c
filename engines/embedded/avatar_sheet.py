"""Contact sheet and timing of the embedded avatar: renders ~3 s of speech-like audio (or
espeak-ng speech when the `espeak-ng` program is installed) from the default portrait and
tiles frames into a labelled grid, so a person can see at a glance whether the mouth,
blinks and head motion work.

    python -m avatard.engines.embedded.avatar_sheet docs/contact-sheet.png
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import time
import wave

import cv2
import numpy as np
from PIL import Image

from .avatar import (
    AUDIO_RATE,
    EmbeddedAvatarEngine,
    _Motion,
    default_portrait,
    speech_like_signal,
)

SHEET_TEXT = "Hello! I am the avatar that ships with avatard. Nothing to download."


def espeak_speech(text: str) -> np.ndarray | None:
    """`text` spoken by espeak-ng as float32 mono at 16 kHz, or None without espeak-ng."""
    program = shutil.which("espeak-ng")
    if program is None:
        return None
    result = subprocess.run([program, "--stdout", text], capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        return None
    with wave.open(io.BytesIO(result.stdout)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    pcm = samples.astype(np.float32) / 32768.0
    if rate != AUDIO_RATE:  # linear resampling is enough for driving a mouth
        positions = np.arange(0, pcm.size, rate / AUDIO_RATE)
        pcm = np.interp(positions, np.arange(pcm.size), pcm).astype(np.float32)
    return pcm


def contact_sheet(
    frames: list[np.ndarray],
    indices: list[int],
    columns: int = 4,
    crop: tuple[int, int, int, int] | None = None,
    tile_width: int | None = None,
) -> np.ndarray:
    """Tile `frames[i]` for i in `indices` into a grid, each labelled with its frame number."""
    tiles = []
    for index in indices:
        tile = frames[index]
        if crop is not None:
            x0, y0, x1, y1 = crop
            tile = tile[y0:y1, x0:x1]
        if tile_width is not None and tile.shape[1] != tile_width:
            height = round(tile.shape[0] * tile_width / tile.shape[1])
            tile = cv2.resize(tile, (tile_width, height), interpolation=cv2.INTER_AREA)
        tile = np.ascontiguousarray(tile)
        cv2.rectangle(tile, (0, 0), (74, 22), (0, 0, 0), -1)
        cv2.putText(
            tile,
            f"#{index:03d}",
            (4, 17),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        tiles.append(tile)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="PNG file to write")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.2)
    args = parser.parse_args()

    cv2.setNumThreads(1)  # measure on one core, as the CPU budget promises
    engine = EmbeddedAvatarEngine("cpu", {}, lambda stage, fraction: None)
    state = engine.register(default_portrait())
    speech = espeak_speech(SHEET_TEXT)
    source = "espeak-ng"
    if speech is None:
        speech, source = speech_like_signal(args.seconds, seed=3), "synthetic speech-like signal"
    speech = speech[: int(args.seconds * AUDIO_RATE)]
    started = time.perf_counter()
    frames = list(engine.render(state, speech, seed=args.seed))
    per_frame_ms = (time.perf_counter() - started) / len(frames) * 1000.0
    # 16 frames spread over the clip, with each fully shut blink frame swapped in for the
    # nearest of them so the sheet shows the blinks too.
    indices = [round(i * (len(frames) - 1) / 15) for i in range(16)]
    motion = _Motion(args.seed)
    for frame in range(len(frames)):
        if motion.blink(frame) == 1.0:
            nearest = min(range(len(indices)), key=lambda i: abs(indices[i] - frame))
            indices[nearest] = frame
    fx, fy, fw, fh = state.extras["face_box"]
    rig = state.payload.rig
    x0, y0, x1, y1 = rig.roi
    crop = (max(0, x0 - 40), max(0, y0 - 60), min(512, x1 + 40), min(512, y1 + 10))
    sheet = contact_sheet(frames, indices, columns=4, crop=crop, tile_width=240)
    # A 256-colour palette keeps the sheet small in the repository; dithering hides it.
    Image.fromarray(sheet).quantize(256).save(args.output, optimize=True)
    print(f"{len(frames)} frames from {source}; {per_frame_ms:.2f} ms per frame on one core")


if __name__ == "__main__":
    main()
