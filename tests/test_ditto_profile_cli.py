"""`python -m avatard.bench.ditto_profile` refuses bad arguments before building an engine."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from avatard.bench import ditto_profile  # noqa: E402


def test_unknown_serving_layers_mode_is_refused_naming_the_value(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        ditto_profile.main(["--device", "cpu", "--serving-layers", "on,maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--serving-layers" in err and "'maybe'" in err
