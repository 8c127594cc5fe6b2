"""The run report: written at the end of a run and by `python -m orchestrator report`, every figure rendered
in a real headless browser (Debian's Chromium driven by Playwright), and a screenshot kept for a person."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from orchestrator.driver import Driver
from orchestrator.monitoring.report import FIGURES
from tests.conftest import tiny_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip():
    """Chromium and Playwright, or a skip that says how to get them (a failure in CI, which installs them)."""
    missing = []
    if CHROMIUM is None:
        missing.append("Chromium (Debian: apt-get install chromium)")
    if find_spec("playwright") is None:
        missing.append("playwright (pip install -e '.[dev]')")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the report test needs {' and '.join(missing)}; .ci/run installs them")
        pytest.skip(f"needs {' and '.join(missing)}")


def test_report_renders_every_figure_in_a_headless_browser(ray_session, tmp_path):
    run = tmp_path / "reported"
    cfg = tiny_config(run, "cluster.num_devices=2", "train.steps=12", "train.eval_every=4", "monitor.report=true",
                      "faults.plan=[{step: 7, kind: kill, rank: 0}]",
                      "monitor.alerts=[{rule: maxvio, threshold: 0.0001, steps: 3, action: notify}]")
    Driver(cfg, run).run()
    page_file = run / "report.html"
    assert page_file.exists()   # written at the end of the run
    again = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(run), "--out", str(tmp_path / "r.html")],
                           capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert again.returncode == 0 and (tmp_path / "r.html").stat().st_size > 10_000, again.stderr
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(page_file.as_uri())
        shown = page.evaluate("""() => [...document.querySelectorAll('figure')].map(f => {
            const img = f.querySelector('img');
            return [f.id, !!img && img.complete && img.naturalWidth > 300 && img.naturalHeight > 150];
        })""")
        facts = page.inner_text("#facts")
        incidents = page.inner_text("h2:has-text('Incidents') + table")
        alerts = page.inner_text("h2:has-text('Alerts') + table")
        shot = Path(os.environ.get("REPORT_SCREENSHOT", tmp_path / "report.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert dict(shown) == {f: True for f in FIGURES}
    assert "steps done\t12" in facts and "recoveries\t1" in facts and "alerts\t1" in facts
    assert "dead" in incidents and "replaced" in incidents
    assert "maxvio" in alerts and "notify" in alerts
    assert shot.stat().st_size > 50_000


def test_report_of_a_directory_without_steps_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(tmp_path)], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 1 and "metrics.jsonl has no steps" in res.stderr
