"""Where the Ditto reference material (manifests, vectors) is: `../shared/ditto` beside the
repository, or $AVATARD_DITTO_SHARED."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_ditto() -> Path:
    override = os.environ.get("AVATARD_DITTO_SHARED")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "ditto"


SHARED = shared_ditto()
VECTORS = SHARED / "vectors"
MANIFESTS = SHARED / "manifest"

# In CI the material is always beside the clone: a skip there would hide a broken set-up,
# so CI (AVATARD_EXPECT_INSTALLED=1) fails instead of skipping.
needs_shared = pytest.mark.skipif(
    not (VECTORS.is_dir() and MANIFESTS.is_dir())
    and os.environ.get("AVATARD_EXPECT_INSTALLED") != "1",
    reason=f"Ditto reference material not found at {SHARED} (set AVATARD_DITTO_SHARED)",
)

# Upstream's motion pipeline (audio features -> driving keypoints), recorded per case.
MOTION = SHARED / "motion"
needs_motion = pytest.mark.skipif(
    not MOTION.is_dir() and os.environ.get("AVATARD_EXPECT_INSTALLED") != "1",
    reason=f"Ditto motion vectors not found at {MOTION} (set AVATARD_DITTO_SHARED)",
)


def resolved_futures(frames) -> list:
    """A finished Future per frame (a copy each): what a frame submitter returns when a
    test stands in for the renderer."""
    from concurrent.futures import Future

    futures = []
    for frame in frames:
        future: Future = Future()
        future.set_result(frame.copy())
        futures.append(future)
    return futures
