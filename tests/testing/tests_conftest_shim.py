"""require_myo_data without importing the root conftest module by name (pytest owns that import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MYO_DATA = Path(os.environ.get("SEMG_MYO_DATA", Path(__file__).resolve().parents[3] / "shared" / "data" / "myo-armband"
                                / "pretraining"))


def require_myo_data() -> Path:
    if not (MYO_DATA / "Female0").is_dir():
        pytest.skip(f"Myo-armband data set not found at {MYO_DATA} (set SEMG_MYO_DATA to its pretraining folder)")
    return MYO_DATA
