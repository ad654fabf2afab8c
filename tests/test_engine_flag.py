"""`--engine` means the same for `avatard serve` and for the private daemon of the client
commands (render, lipsync, transcribe, voices): `fake` fakes TTS and ASR too, and --help
says so in the same words."""

from __future__ import annotations

import json
import subprocess

from daemon_harness import AVATARD

from avatard.daemon.config import ENGINE_FLAG_HELP
from avatard.daemon.render import engine_overrides


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([AVATARD, *args], capture_output=True, text=True, timeout=timeout)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_of_serve_and_render_say_what_engine_sets():
    for command in ("serve", "render", "lipsync", "transcribe", "voices"):
        result = _run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "also makes the TTS and ASR engines fake" in _flat(result.stdout), command
    assert "also makes the TTS and ASR engines fake" in ENGINE_FLAG_HELP


def test_engine_fake_fakes_speech_unless_set_names_it():
    assert engine_overrides("fake", ()) == [
        "engines.avatar=fake", "engines.tts=fake", "engines.asr=fake"]
    assert engine_overrides("fake", ("engines.tts=embedded",)) == [
        "engines.tts=embedded", "engines.avatar=fake", "engines.asr=fake"]
    assert engine_overrides("embedded", ()) == ["engines.avatar=embedded"]
    assert engine_overrides(None, ("daemon.workers=2",)) == ["daemon.workers=2"]


def test_a_private_daemon_of_engine_fake_speaks_with_the_fake_tts(tmp_path):
    # No daemon at this endpoint: the command starts a private one with --engine fake.
    result = _run("voices", "--json", "--engine", "fake", "--endpoint",
                  f"ipc://{tmp_path}/nobody.sock")
    assert result.returncode == 0, result.stderr
    assert "starting a private one" in result.stderr
    assert json.loads(result.stdout)["engine"] == "fake"
