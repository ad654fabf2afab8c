"""`avatard ditto ...` commands (attached to the main CLI by the daemon package)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group(help="Ditto talking-head engine tools.")
def ditto() -> None:
    pass


@ditto.command("verify")
@click.argument(
    "vectors_dir", type=click.Path(file_okay=False, path_type=Path), metavar="VECTORS_DIR"
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--manifests",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Manifest folder [default: VECTORS_DIR/../manifest]",
)
@click.option(
    "--tolerance",
    type=float,
    default=1e-4,
    show_default=True,
    help="Largest relative L2 error accepted per output array.",
)
@click.option(
    "--serving",
    is_flag=True,
    help="Check the warp network and decoder as the engine serves them (slow layers "
    "rewritten into equivalent faster ones).",
)
def verify_command(
    vectors_dir: Path, device: str, dtype: str, manifests: Path | None, tolerance: float,
    serving: bool,
) -> None:
    """Run our networks with the synthetic weights on every VECTORS_DIR/*.npz and compare
    each output with its reference (relative L2 error). Exits 1 if any output is above
    the tolerance or any file could not be checked."""
    # torch is imported here so `avatard --help` stays light.
    from .verify import verify

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"--device {device}: CUDA is not available")
    mode = ", serving layers" if serving else ""
    click.echo(f"ditto verify: {vectors_dir} on {device} in {dtype}, tolerance {tolerance:g}"
               f"{mode}")
    results = verify(
        vectors_dir,
        manifests,
        device=device,
        dtype=dtype,
        tolerance=tolerance,
        progress=lambda r: click.echo(r.line()),
        serving=serving,
    )
    failed = [r for r in results if not r.passed]
    click.echo(f"{len(results) - len(failed)} of {len(results)} checks passed")
    if failed:
        click.echo(f"{len(failed)} failed or not checked", err=True)
        sys.exit(1)


def main() -> None:  # pragma: no cover - convenience entry for `python -m`
    ditto()


if __name__ == "__main__":  # pragma: no cover
    main()
