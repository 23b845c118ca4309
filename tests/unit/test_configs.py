"""Every shipped config in configs/ is valid: it loads through the same validation as a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.shards and cfg.run.dir
    if cfg.finetune.method != "full":
        assert cfg.finetune.lora.r >= 1


def test_all_real_configs_are_listed_in_the_configs_readme() -> None:
    readme = (CONFIGS[0].parent / "README.md").read_text()
    assert all(f"`{p.name}`" in readme for p in CONFIGS), [
        p.name for p in CONFIGS if f"`{p.name}`" not in readme
    ]
