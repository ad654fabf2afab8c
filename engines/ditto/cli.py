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
    type=click.Choice(["float32", "bfloat16", "float16"]),
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
    default=None,
    help="Largest relative L2 error accepted per output array [default: 1e-4 for the "
    "networks; for a motion folder 1e-5 per stage and 1e-4 for x_d end to end].",
)
@click.option(
    "--serving",
    is_flag=True,
    help="Check the warp network and decoder as the engine serves them (slow layers "
    "rewritten into equivalent faster ones).",
)
def verify_command(
    vectors_dir: Path, device: str, dtype: str, manifests: Path | None,
    tolerance: float | None, serving: bool,
) -> None:
    """Run our networks with the synthetic weights on every VECTORS_DIR/*.npz and compare
    each output with its reference (relative L2 error). Exits 1 if any output is above
    the tolerance or any file could not be checked.

    A motion folder (offline_*.npz / online_*.npz cases beside ditto_motion_cfg.pkl and
    manifest/, like ../shared/ditto/motion) is checked case by case and stage by stage
    instead: sampler, blinks, conditions, LMDM windows, motion, stitch, end to end."""
    # torch is imported here so `avatard --help` stays light.
    from .verify import verify
    from .verify_motion import is_motion_folder, verify_motion

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"--device {device}: CUDA is not available")
    if is_motion_folder(vectors_dir):
        stage_tol = 1e-5 if tolerance is None else tolerance
        e2e_tol = 1e-4 if tolerance is None else tolerance
        click.echo(f"ditto verify (motion pipeline): {vectors_dir} on {device} in float32, "
                   f"tolerance {stage_tol:g} per stage, {e2e_tol:g} for x_d end to end")
        results = verify_motion(vectors_dir, device=device, tolerance=stage_tol,
                                end_to_end_tolerance=e2e_tol,
                                progress=lambda r: click.echo(r.line()))
        _summary(results)
        return
    tolerance = 1e-4 if tolerance is None else tolerance
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
    _summary(results)


def _summary(results: list) -> None:
    failed = [r for r in results if not r.passed]
    click.echo(f"{len(results) - len(failed)} of {len(results)} checks passed")
    if failed:
        click.echo(f"{len(failed)} failed or not checked", err=True)
        sys.exit(1)


def main() -> None:  # pragma: no cover - convenience entry for `python -m`
    ditto()


if __name__ == "__main__":  # pragma: no cover
    main()
