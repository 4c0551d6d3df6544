"""An environment that produces nothing stops the run within minutes, the message naming it and the cause."""

from __future__ import annotations

import pytest

from recipe.atropos.tests.test_integration import assets, launch  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_an_environment_that_produces_nothing_is_named(launch):  # noqa: F811
    run = launch(
        "services.envs=[{name:silent,module:tests.envs.silent}]",
        "services.first_step_timeout_s=30",
    )
    assert run.finish(timeout=900) == 1
    console = run.console
    assert "FAILED: no step trained within 30 s of the environments registering" in console, console[-3000:]
    report = next(line for line in console.splitlines() if "silent_0 (env_id 0)" in line)
    assert "gateway requests: none" in report and "groups posted: 0" in report
    assert "this environment never builds a group" in report
    assert run.alive() == []
