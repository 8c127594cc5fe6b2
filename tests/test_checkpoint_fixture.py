"""A checkpoint written by earlier code resumes with today's: the committed fixture (tests/fixtures/checkpoint_v1,
2 devices, ZeRO-1, made before issue 20 moved the modules) verifies, and its resume gives the losses that the code
which wrote it gave."""
from __future__ import annotations

import json
import shutil

from orchestrator.checkpoint import verify
from orchestrator.checkpoint.storage import Storage
from orchestrator.driver import Driver
from tests.conftest import step_records, tiny_config
from tests.fixture_checkpoint import OUT, resume_overrides


def test_a_checkpoint_from_before_the_move_resumes_with_the_same_losses(ray_session, tmp_path):
    expected = json.loads((OUT / "expected.json").read_text())
    folder = tmp_path / expected["checkpoint"]
    shutil.copytree(OUT / expected["checkpoint"], folder)  # a resume never writes into it, but keep the fixture pure
    manifest, problem = verify(Storage(str(folder)))
    assert problem is None and manifest.step == 4
    run = tmp_path / "run"
    result = Driver(tiny_config(run, *resume_overrides(folder)), run).run()
    assert result.resumed_from_step == 4 and result.steps_done == 3
    losses = [r["loss"] for r in step_records(run)]
    assert [r["step"] for r in step_records(run)] == [5, 6, 7]
    assert losses == expected["losses"]
