"""The settings of the committed checkpoint fixture (tests/fixtures/checkpoint_v1), shared by the script that made
it and the test that resumes it."""
from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v1"
# the fixture was made with one dispatch chunk (the default before issue 23); two chunks give the same losses only to
# float32 rounding on some CPUs (an AVX2 EPYC: step 7 off by 2.4e-7), so the resume keeps the settings it was made with
_BASE = ["cluster.num_devices=2", "memory.zero_stage=1", "train.eval_batches=0", "parallel.dispatch_chunks=1"]


def save_overrides() -> list[str]:
    return ["train.steps=4", *_BASE]


def resume_overrides(path: Path) -> list[str]:
    return ["train.steps=7", *_BASE, f"train.resume={path}"]
