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


def test_profile_tables_name_the_shapes_of_the_convolutions() -> None:
    # The shapes table is how a heavy kernel is traced to its layer: the convolution's
    # input and weight shapes appear beside it.
    import torch

    conv = torch.nn.Conv2d(3, 8, 5)
    x = torch.randn(2, 3, 20, 20)
    with torch.inference_mode():
        tables = ditto_profile.profile_tables(lambda: conv(x), "cpu", kernels=True,
                                              shapes=True, calls=2)
    assert set(tables) == {"kernels", "shapes"}
    assert "aten::conv2d" in tables["kernels"]
    assert "[2, 3, 20, 20]" in tables["shapes"] and "[8, 3, 5, 5]" in tables["shapes"]
    assert ditto_profile.profile_tables(lambda: conv(x), "cpu", kernels=False,
                                        shapes=False) == {}
