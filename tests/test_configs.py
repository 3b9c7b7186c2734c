"""Every shipped config loads and passes the checks that need no data."""
from pathlib import Path

import pytest

from train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(str(path))
    assert cfg.data.path and (cfg.model.name_or_path or cfg.model.config)
