"""The package versions the whole suite last passed with (constraints.txt, written by `make constraints`)
and how the installed ones differ from them. pytest prints the difference in its header, so a run of
`make test-latest` starts by saying which releases it is trying."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import REPO

CONSTRAINTS = REPO / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Canonical package name -> the exact version constraints.txt pins it to."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(
                f"{path}:{number}: {line!r} is not 'name==version'; write the file with 'make constraints'"
            )
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def differences(path: Path = CONSTRAINTS) -> list[str]:
    """'name installed (pinned P)' for every pinned package installed at another version. A local label
    (torch's +cu128) does not count: a CUDA build of the pinned release is that release."""
    found = []
    for name, pin in sorted(pinned(path).items()):
        try:
            installed = version(name)
        except PackageNotFoundError:  # not on this platform (decord off x86_64, CUDA libraries)
            continue
        if Version(installed).public != Version(pin).public:
            found.append(f"{name} {installed} (pinned {pin})")
    return found
