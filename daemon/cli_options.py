"""Command-line options that several `avatard` commands share, in a module of their own so
that every command module can import them at its top without importing another command
module (`avatard.daemon.cli` registers `avatard.integrations.cli`'s command). Imports
only click and the standard library."""

from __future__ import annotations

import os

import click

# Suffixes that make an --avatar value a file name rather than a registered portrait's id
# (which is 32 hex digits: `avatard.daemon.avatars`).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                            ".tiff"})


def check_avatar(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> str | None:
    """--avatar of render, lipsync, live and livekit: an existing image file, or the id of a
    portrait registered before. A value that names a file (a path separator or an image
    suffix) but none exists is a usage error saying so, not a portrait the daemon does not
    know."""
    if value is None or os.path.isfile(value):
        return value
    if os.sep in value or "/" in value or os.path.splitext(value)[1].lower() in IMAGE_SUFFIXES:
        why = "is not a file" if os.path.exists(value) else "does not exist"
        raise click.BadParameter(
            f"image file {value!r} {why} (a value with a path separator or an image suffix "
            "names a file; a registered portrait's id has neither)", ctx=ctx, param=param)
    return value


def avatar_option(func):
    """The --avatar option of render, lipsync, live and livekit (`check_avatar`)."""
    return click.option(
        "--avatar", callback=check_avatar,
        help="Portrait: an image file (PNG/JPEG; registered for the call) or the id of a "
        "portrait registered before. Default: the engine's built-in portrait.")(func)
