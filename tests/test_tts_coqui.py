"""Coqui TTS engine: the real loading path on a tiny VITS model the test builds itself.

The model has random weights (its speech is noise) but goes through exactly what a real
zoo model goes through: config.json + checkpoint + speakers file in a directory, loaded by
Coqui's Synthesizer, with speaker selection and per-sentence synthesis.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from avatard.engines.base import EngineInputError, TTSEngine
from avatard.engines.coqui_tts import CoquiTTSEngine, find_checkpoint, localise_config
from avatard.engines.registry import load_engine

SPEAKERS = ["alice", "bob"]


def test_model_dir_is_required_and_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="model_dir"):
        CoquiTTSEngine(options={})
    with pytest.raises(FileNotFoundError, match="config.json"):
        CoquiTTSEngine(options={"model_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        CoquiTTSEngine(options={"model_dir": str(tmp_path)})


def test_checkpoint_search_order(tmp_path: Path):
    (tmp_path / "checkpoint_100.pth").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "checkpoint_100.pth"
    (tmp_path / "best_model.pth").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "best_model.pth"
    (tmp_path / "model.pth").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "model.pth"
    assert find_checkpoint(tmp_path, "best_model.pth").name == "best_model.pth"


def test_side_file_paths_are_pointed_into_the_model_dir(tmp_path: Path):
    (tmp_path / "speakers.json").write_text("{}")
    config = {"speakers_file": "/trainer/run/speakers.json", "model_args": {"speakers_file": None}}
    fixed = localise_config(config, tmp_path)
    assert fixed["speakers_file"] == str(tmp_path / "speakers.json")
    with pytest.raises(FileNotFoundError, match="language_ids_file"):
        localise_config({"language_ids_file": "/elsewhere/language_ids.json"}, tmp_path)


# ---------------------------------------------------------------------------- real model


def build_tiny_vits(model_dir: Path, speakers: list[str]) -> None:
    """Save a ~250k-parameter multi-speaker VITS with random weights, as a zoo would."""
    import torch
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    model_dir.mkdir(parents=True, exist_ok=True)
    speakers_file = model_dir / "speakers.json"
    speakers_file.write_text(json.dumps({name: i for i, name in enumerate(speakers)}))
    args = VitsArgs(
        out_channels=257,  # fft_size / 2 + 1
        hidden_channels=16,
        hidden_channels_ffn_text_encoder=32,
        num_heads_text_encoder=2,
        num_layers_text_encoder=1,
        num_layers_posterior_encoder=1,
        num_layers_flow=1,
        resblock_kernel_sizes_decoder=[3],
        resblock_dilation_sizes_decoder=[[1, 3, 5]],
        upsample_initial_channel_decoder=16,  # upsample rates 8*8*2*2 = hop_length 256
        init_discriminator=False,
        use_sdp=False,
        use_speaker_embedding=True,
        speaker_embedding_channels=8,
        speakers_file=str(speakers_file),
    )
    config = VitsConfig(
        model_args=args,
        use_phonemes=False,  # graphemes: no espeak phonemizer needed
        text_cleaner="basic_cleaners",
        audio=BaseAudioConfig(
            sample_rate=16000, fft_size=512, win_length=512, hop_length=256, num_mels=40
        ),
        use_speaker_embedding=True,
        speakers_file=str(speakers_file),
    )
    torch.manual_seed(0)
    model = Vits(config)
    torch.save({"model": model.state_dict()}, model_dir / "model.pth")
    config.save_json(str(model_dir / "config.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(
        "TTS",
        reason="coqui-tts not importable (it needs torchaudio matching torch)",
        exc_type=ImportError,
    )
    directory = tmp_path_factory.mktemp("coqui") / "tiny-vits"
    build_tiny_vits(directory, SPEAKERS)
    return directory


@pytest.fixture(scope="module")
def tts(model_dir: Path) -> TTSEngine:
    stages: list[str] = []
    engine = load_engine(
        "tts",
        "coqui",
        options={"model_dir": str(model_dir)},
        progress=lambda stage, fraction: stages.append(stage),
    )
    assert stages[0] == "check model" and stages[-1] == "ready" and "load model" in stages
    return engine


def test_loads_speakers_and_rate(tts: TTSEngine):
    assert tts.voices() == SPEAKERS
    assert tts.sample_rate == 16000
    # Speakers are the voices; the model routes between its languages, not voices.
    assert [(v.name, v.sample_rate) for v in tts.voice_list()] == [(s, 16000) for s in SPEAKERS]
    assert tts.voices_by_language() == {}


def test_streams_one_chunk_per_sentence(tts: TTSEngine):
    chunks = list(tts.stream("Hello there. How are you today? Fine!", "bob"))
    assert len(chunks) == 3
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1 and chunk.size > 0
        assert np.isfinite(chunk).all() and float(np.abs(chunk).max()) > 0


def test_same_text_and_seed_give_the_same_audio(tts: TTSEngine):
    first = tts.synthesize("Say it again.", "alice")[0]
    second = tts.synthesize("Say it again.", "alice")[0]
    assert np.array_equal(first, second)


def test_speakers_sound_different(tts: TTSEngine):
    alice = tts.synthesize("Same words.", "alice")[0]
    bob = tts.synthesize("Same words.", "bob")[0]
    assert alice.shape != bob.shape or not np.array_equal(alice, bob)


def test_bad_input_is_refused(tts: TTSEngine):
    with pytest.raises(EngineInputError) as error:
        tts.stream("Hello.", "carol")
    assert error.value.field == "voice"
    with pytest.raises(EngineInputError) as error:
        tts.stream("")
    assert error.value.field == "text"
    with pytest.raises(EngineInputError) as error:
        tts.stream("x" * 1_000_000)
    assert error.value.field == "text" and "5000" in error.value.rule


def test_default_speaker_option_and_unknown_speaker(model_dir: Path):
    engine = CoquiTTSEngine(options={"model_dir": str(model_dir), "speaker": "bob"})
    assert engine.voices()[0] == "bob"
    with pytest.raises(ValueError, match="carol"):
        CoquiTTSEngine(options={"model_dir": str(model_dir), "speaker": "carol"})


def test_directory_moved_from_where_it_was_trained(model_dir: Path, tmp_path: Path):
    # config.json still names the speakers file at its old absolute path.
    moved = tmp_path / "copied-model"
    shutil.copytree(model_dir, moved)
    engine = CoquiTTSEngine(options={"model_dir": str(moved)})
    assert engine.voices() == SPEAKERS
    assert engine.report().notes == "copied-model"
