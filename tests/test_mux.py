"""mp4 writing: streaming input, timestamps, track lengths, and failing fast on bad paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from avatard.engines.mux import (
    AUDIO_ENCODERS,
    VIDEO_ENCODERS,
    Mp4Writer,
    pick_encoder,
    plan_padding,
    read_mp4,
)

WIDTH, HEIGHT = 64, 48


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(count)]


def speech_like(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )


def assert_within_one_frame(info, fps: int) -> None:
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1.0 / fps + 1e-6


@pytest.mark.parametrize(("fps", "rate"), [(25, 16000), (25, 22050), (30, 44100), (24, 48000)])
def test_interleaved_streaming_write_reads_back(tmp_path: Path, fps: int, rate: int):
    path = tmp_path / "out.mp4"
    seconds = 2.0
    audio = speech_like(seconds, rate)
    video = frames(int(seconds * fps))
    rng = np.random.default_rng(1)
    # Audio arrives in uneven chunks, as a TTS stream produces it, between frames.
    cuts = np.sort(rng.integers(0, audio.size, size=len(video) - 1))
    chunks = np.split(audio, cuts)
    with Mp4Writer(path, fps, WIDTH, HEIGHT, rate) as writer:
        for frame, chunk in zip(video, chunks, strict=True):
            writer.write_frame(frame)
            writer.write_audio(chunk)
    info = read_mp4(path)
    assert info.frame_count >= len(video)
    assert info.frame_count - len(video) <= 4  # padding to an AAC frame boundary at most
    assert info.video_duration_s == pytest.approx(info.frame_count / fps)
    assert info.audio_duration_s >= seconds - 1e-6
    assert_within_one_frame(info, fps)


def test_aligned_input_is_written_exactly(tmp_path: Path):
    # 3.2 s is 80 frames at 25 fps and 50 AAC frames at 16 kHz: no padding is needed.
    path = tmp_path / "exact.mp4"
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
        for frame in frames(80):
            writer.write_frame(frame)
        writer.write_audio(speech_like(3.2, 16000))
    info = read_mp4(path)
    assert info.frame_count == 80
    assert info.video_duration_s == pytest.approx(3.2)
    assert info.audio_duration_s == pytest.approx(3.2)


def test_longer_audio_extends_video_with_the_last_frame(tmp_path: Path):
    path = tmp_path / "a.mp4"
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
        for frame in frames(10):
            writer.write_frame(frame)
        writer.write_audio(speech_like(1.5, 16000))
    info = read_mp4(path)
    assert info.frame_count >= 37 and info.audio_duration_s >= 1.5
    assert_within_one_frame(info, 25)


def test_longer_video_gets_silence(tmp_path: Path):
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
        for frame in frames(50):
            writer.write_frame(frame)
        writer.write_audio(speech_like(0.3, 16000))
    info = read_mp4(path)
    assert info.frame_count >= 50
    assert_within_one_frame(info, 25)


def test_audio_only_gets_a_picture(tmp_path: Path):
    path = tmp_path / "audio_only.mp4"
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
        writer.write_audio(speech_like(0.8, 16000))
    info = read_mp4(path)
    assert info.frame_count >= 20
    assert_within_one_frame(info, 25)


def test_odd_audio_rate_is_resampled_for_the_encoder(tmp_path: Path):
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 37000) as writer:
        for frame in frames(25):
            writer.write_frame(frame)
        writer.write_audio(speech_like(1.0, 37000))
    assert_within_one_frame(read_mp4(path), 25)


def test_frames_decode_to_what_was_written(tmp_path: Path):
    import av

    path = tmp_path / "colors.mp4"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
        for colour in colours:
            writer.write_frame(np.full((HEIGHT, WIDTH, 3), colour, np.uint8))
        writer.write_audio(np.zeros(int(16000 * 0.12), np.float32))
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for colour, frame in zip(colours, decoded, strict=False):
        assert np.abs(frame.reshape(-1, 3).mean(axis=0) - colour).max() < 12


def test_missing_directory_fails_before_any_work(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4Writer(tmp_path / "no" / "such" / "dir.mp4", 25, WIDTH, HEIGHT, 16000)
    assert not (tmp_path / "no").exists()


def test_path_under_a_file_or_a_directory_path_fails(tmp_path: Path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(FileNotFoundError):
        Mp4Writer(blocker / "out.mp4", 25, WIDTH, HEIGHT, 16000)
    with pytest.raises(IsADirectoryError):
        Mp4Writer(tmp_path, 25, WIDTH, HEIGHT, 16000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_read_only_directory_fails(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            Mp4Writer(locked / "out.mp4", 25, WIDTH, HEIGHT, 16000)
    finally:
        locked.chmod(0o700)


def test_failure_inside_the_block_leaves_no_partial_file(tmp_path: Path):
    path = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="render failed"):
        with Mp4Writer(path, 25, WIDTH, HEIGHT, 16000) as writer:
            for frame in frames(30):
                writer.write_frame(frame)
            raise RuntimeError("render failed")
    assert not path.exists()


def test_bad_arguments_and_frames_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "x.mp4", 25, 63, 48, 16000)
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "x.mp4", 0, 64, 48, 16000)
    with pytest.raises(ValueError, match="audio_rate"):
        Mp4Writer(tmp_path / "x.mp4", 25, 64, 48, 1000)
    with Mp4Writer(tmp_path / "y.mp4", 25, WIDTH, HEIGHT, 16000) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.write_frame(np.zeros((HEIGHT, WIDTH + 2, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write_frame(np.zeros((HEIGHT, WIDTH, 3), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            writer.write_audio(np.full(100, np.nan, np.float32))
        writer.write_frame(frames(1)[0])


def test_nothing_written_is_an_error(tmp_path: Path):
    writer = Mp4Writer(tmp_path / "empty.mp4", 25, WIDTH, HEIGHT, 16000)
    with pytest.raises(RuntimeError, match="nothing was written"):
        writer.close()


def test_encoders_are_detected():
    assert pick_encoder(VIDEO_ENCODERS) in VIDEO_ENCODERS
    assert pick_encoder(AUDIO_ENCODERS) in AUDIO_ENCODERS
    with pytest.raises(RuntimeError, match="none of the encoders"):
        pick_encoder(("no-such-encoder",))


@pytest.mark.parametrize(
    ("video_encoder", "audio_encoder"), [("libx264", "libopus"), ("mpeg4", "opus")]
)
def test_fallback_encoders_write_a_valid_file(
    tmp_path: Path, video_encoder: str, audio_encoder: str
):
    # What a PyAV built against a system FFmpeg without libx264 or AAC would pick.
    path = tmp_path / f"{video_encoder}-{audio_encoder}.mp4"
    with Mp4Writer(
        path,
        25,
        WIDTH,
        HEIGHT,
        16000,
        video_encoders=(video_encoder,),
        audio_encoders=(audio_encoder,),
    ) as writer:
        assert (writer.video_codec, writer.audio_codec) == (video_encoder, audio_encoder)
        for frame in frames(25):
            writer.write_frame(frame)
        writer.write_audio(speech_like(1.0, 16000))
    info = read_mp4(path)
    assert info.frame_count == 25
    assert_within_one_frame(info, 25)


def test_tts_stream_into_mp4(tmp_path: Path):
    # The render pipeline's audio path: per-sentence TTS chunks straight into the writer.
    pytest.importorskip("piper", reason="needs the embedded TTS")
    from avatard.engines.registry import load_engine

    tts = load_engine("tts", "embedded")
    path = tmp_path / "spoken.mp4"
    fps = 25
    written_samples = 0
    with Mp4Writer(path, fps, WIDTH, HEIGHT, tts.sample_rate) as writer:
        for chunk in tts.stream("One short sentence. And another one."):
            writer.write_audio(chunk)
            written_samples += chunk.size
            while writer.frames_written < written_samples * fps // tts.sample_rate:
                writer.write_frame(np.full((HEIGHT, WIDTH, 3), 128, np.uint8))
    info = read_mp4(path)
    assert info.audio_duration_s >= written_samples / tts.sample_rate - 1e-6
    assert_within_one_frame(info, fps)


@pytest.mark.parametrize("fps", [24, 25, 30, 60])
@pytest.mark.parametrize("codec_frame_s", [1024 / 16000, 1024 / 22050, 1024 / 48000, 0.02])
def test_padding_plan_ends_both_tracks_together(fps: int, codec_frame_s: float):
    rng = np.random.default_rng(fps)
    for _ in range(50):
        frames_written = int(rng.integers(1, 500))
        audio_s = float(rng.uniform(0.01, 20.0))
        frame_count, audio_end_s = plan_padding(frames_written, audio_s, fps, codec_frame_s)
        assert frame_count >= frames_written and audio_end_s >= audio_s - 1e-9
        assert abs(audio_end_s - frame_count / fps) <= 0.5 / fps + 1e-9
        codec_frames = audio_end_s / codec_frame_s
        assert abs(codec_frames - round(codec_frames)) < 1e-6
