from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.media import make_media  # noqa: E402


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name -> path of every real and odd media file the converter must handle."""
    return make_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two cores: keep native thread pools from oversubscribing when tests spawn workers.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """tiny("llava") -> directory of a tiny random-weight checkpoint of that family, built once."""
    from trainer.tiny import build_tiny

    os.environ["HF_HUB_OFFLINE"] = "1"
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def stream_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard directory for pipeline tests (see tests/support/shards.py): 58 occurrences an epoch."""
    from tests.support.shards import build_shards

    return build_shards(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="session")
def overfit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four samples (two photographs, two text-only) a tiny model can memorise."""
    from data_tools.samples import build_overfit_shards

    return build_overfit_shards(tmp_path_factory.mktemp("overfit"))


def pytest_report_header() -> list[str]:
    from tests.support.versions import CONSTRAINTS, differences

    changed = differences()
    if not changed:
        return [f"versions: as pinned in {CONSTRAINTS.name}"]
    return [f"versions: {len(changed)} differ from {CONSTRAINTS.name}:", *(f"  {line}" for line in changed)]


@pytest.fixture(scope="session")
def mix_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three text sources at 50 / 25 / 25 % of a 1,200-sample epoch, input sorted by length."""
    from tests.support.shards import build_mix_shards

    return build_mix_shards(tmp_path_factory.mktemp("mix"))
