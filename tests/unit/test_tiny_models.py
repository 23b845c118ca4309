"""Tiny checkpoints (trainer/tiny/): every family builds deterministically, offline, from the
command line. What each family must match of its real model is tested in tests/families/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, family_params
from trainer.models.registry import load_families
from trainer.tiny import FAMILIES, build_tiny, main


def test_every_family_has_an_adapter_a_builder_and_its_oracles() -> None:
    assert list(FAMILIES) == sorted(FAMILIES) and set(FAMILIES) == set(load_families())
    tested = {p.stem.removeprefix("test_") for p in (REPO / "tests" / "families").glob("test_*.py")}
    assert tested == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        build_tiny("gpt2", "/nonexistent")


@pytest.mark.parametrize("family", family_params(sorted(FAMILIES)))
def test_build_is_deterministic(tiny, family: str, tmp_path: Path) -> None:
    first = tiny(family)
    again = build_tiny(family, tmp_path / family)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "model.safetensors",
        "chat_template.jinja",
        "processor_config.json",
    } <= set(names) or "chat_template.json" in names
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), f"{family}/{name}"


@pytest.mark.slow
def test_cli_builds_the_same_bytes_in_a_fresh_process(tiny, tmp_path: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "trainer.tiny", "--list"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == list(FAMILIES)
    # Another process has another hash seed: nothing may depend on set or dict iteration order.
    out = tmp_path / "qwen2_vl"
    subprocess.run(
        [sys.executable, "-m", "trainer.tiny", "--family", "qwen2_vl", "--out", str(out)],
        capture_output=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tiny("qwen2_vl") / name).read_bytes(), name
    assert main(["--list"]) == 0


def test_readme_shows_the_current_families_table() -> None:
    from trainer.models.__main__ import table

    readme = (REPO / "docs" / "families.md").read_text()
    shown = readme.split("<!-- families:start -->\n")[1].split("<!-- families:end -->")[0]
    assert shown.strip() == table(), (
        "docs/families.md out of date: paste `python -m trainer.models --list` into it"
    )
