"""Print pip constraints that pin every dependency pyproject.toml declares to its lower bound (`>=X` -> `==X`).

CI installs the project with these, so the declared lowest versions are the ones actually tested.
"""

import re
import sys
from pathlib import Path

import tomllib

EXTRAS = ("serve",)  # runtime extras; the test tools ([test]) resolve to what is current
UNPINNED: set[str] = set()
# Test tools whose newest release cannot run beside a lower bound: the newest compatible one is taken instead.
# pyarrow 26 needs numpy 2, and lm-eval's `datasets` imports it (numpy's lower bound is 1.26).
COMPANIONS = ("pyarrow<26",)


def lower_bounds(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
        if match is None:
            sys.exit(f"{pyproject}: '{requirement}' has no plain lower bound (name>=version) to test")
        name, version = match.groups()
        if name.lower() not in UNPINNED:
            pins[name.lower()] = f"{name}=={version}"
    return sorted(pins.values()) + list(COMPANIONS)


if __name__ == "__main__":
    print("\n".join(lower_bounds(Path(__file__).resolve().parents[1] / "pyproject.toml")))
