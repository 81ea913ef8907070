"""Guard: the unit and end-to-end suites must run in separate pytest processes (see scripts/test.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    selected = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [Path.cwd().resolve()]
    unit, e2e = (_TESTS / "unit").resolve(), (_TESTS / "e2e").resolve()

    def covers(path: Path, suite: Path) -> bool:
        return path == suite or suite in path.parents or path in suite.parents

    if any(covers(p, unit) for p in selected) and any(covers(p, e2e) for p in selected):
        raise pytest.UsageError(
            "run tests/unit and tests/e2e in separate pytest processes (bash scripts/test.sh): the engine's and "
            "the SDK's generated protobuf modules define the same message names and cannot share a process"
        )
