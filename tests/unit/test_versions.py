"""constraints.txt: the suite runs on the versions it pins, and the pins agree with setup.cfg's bounds."""

from __future__ import annotations

import configparser
import os
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.versions import CONSTRAINTS, differences, pinned

SETUP_CFG = CONSTRAINTS.parent / "setup.cfg"
# Beyond setup.cfg's own requirements: the other packages whose releases change what the suite tests.
ALSO_PINNED = ["tokenizers", "huggingface-hub", "safetensors", "accelerate", "numpy", "pillow", "pytest"]


def requirements() -> list[Requirement]:
    """setup.cfg's install_requires and its dev extra (flash-attn, the other extra, cannot be built here)."""
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["dev"].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


@pytest.mark.skipif(bool(os.environ.get("MMLOOM_UNPINNED")), reason="make test-latest: the newest releases")
def test_the_suite_runs_on_the_pinned_versions() -> None:
    assert differences() == [], (
        "installed versions differ from constraints.txt: reinstall with "
        "`make setup` (pip install --constraint constraints.txt), or try new "
        "releases with `make test-latest`"
    )


def test_every_requirement_is_pinned_inside_setup_cfgs_bounds() -> None:
    pins = pinned()
    reqs = requirements()
    assert {"torch", "transformers", "peft", "webdataset", "decord"} <= {r.name for r in reqs}
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (setup.cfg) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req}"
        )
    for name in ALSO_PINNED:
        assert canonicalize_name(name) in pins, f"{name} has no pin in constraints.txt"


def test_differences_name_each_package_off_its_pin(tmp_path) -> None:
    pytest_version = version("pytest")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        f"# a comment\n\nPyTest=={pytest_version}+cpu\npackaging==0.1\nnot-a-package-mmloom-uses==1.0\n"
    )
    assert differences(constraints) == [f"packaging {version('packaging')} (pinned 0.1)"]
    constraints.write_text("torch>=2.6\n")
    with pytest.raises(ValueError, match=r"constraints.txt:1: 'torch>=2.6' is not 'name==version'"):
        pinned(constraints)


def test_the_readmes_table_of_tested_versions_is_constraints_txt() -> None:
    readme = (CONSTRAINTS.parent / "docs" / "development.md").read_text()
    section = readme.split("### Tested versions", 1)[1]
    table = section.split("\n\n| package | tested |", 1)[1].split("\n\n", 1)[0]
    cells = [c.strip() for line in table.splitlines()[2:] for c in line.strip("|").split("|")]
    listed = dict(zip(cells[::2], cells[1::2]))
    pins = pinned()
    assert {"torch", "transformers", "peft"} <= set(listed)
    assert {name: pins[canonicalize_name(name)] for name in listed} == listed, (
        "docs/development.md's 'Tested versions' table differs from constraints.txt: "
        "copy the new versions into it"
    )
