import os
from pathlib import Path

import pytest

# Keep torch from oversubscribing CI's two cores when tests run S3PRL in subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("S3PRL_STIMULUS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared data (fixtures only); tests that need it skip cleanly without it."""
    if not (SHARED / "crema_d").is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED} (set S3PRL_STIMULUS_SHARED)")
    return SHARED
