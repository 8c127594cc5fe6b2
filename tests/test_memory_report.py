"""The memory puzzle, shown: each device's measured memory (StepReport.memory, metrics.jsonl `device_memory`) in
status.json, TensorBoard and Prometheus, and the run report's jigsaw (measured beside memory_plan.json, and which
slice of which tensor each device holds). Built from hand-made run directories and records: no Ray run."""
from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.monitoring.status import device_status
from orchestrator.monitoring.report import FIGURES, write_report

MIB = 2 ** 20

# the last record's measurement (what the report and the sinks show); earlier steps measured other numbers
LAST = [{"params": 1_000_000, "grads": 1_000_000, "optimizer": 2_000_040, "activations_peak": 3_500_000,
         "rss": 400_000_000},
        {"params": 900_000, "grads": 900_000, "optimizer": 1_800_040, "activations_peak": 3_400_000,
         "rss": 410_000_000}]


def memory_at(step: int) -> list[dict[str, int]]:
    return [{k: v - (3 - step) * 1000 for k, v in m.items()} for m in LAST]


def plan_device(rank: int, start: int, stop: int, ids: str, same_on: list[int]) -> dict:
    """One device of a ZeRO-2 plan over 2 devices (planner.MemoryPlan.to_dict's shape)."""
    parts = {"params": 1_048_576 + rank, "grads": 1_048_576 + rank, "optimizer": 2_097_200,
             "activations_peak": 3_000_000, "comm_buffers": 500_000}
    return {"rank": rank, "dp_index": rank, "ep_index": 0, **parts, "total": sum(parts.values()),
            "holdings": {
                "dense": {f"rows {start}:{stop} of 32": ["embed.weight", "layers.0.attn.wq.weight",
                                                         "layers.0.attn.wk.weight", "layers.0.attn.wv.weight"]},
                "dense_optimizer": "its shards",
                "experts": {"ids": ids, "moe_layers": 2,
                            "whole": ["layers.1.moe.w1", "layers.1.moe.w2", "layers.1.moe.w3"]},
                "experts_optimizer": ["layers.1.moe.w1", "layers.1.moe.w3"],
                "replicas": {"dense": "none", "experts": same_on}}}


PLAN = {"zero_stage": 2, "activation_checkpointing": "selective", "micro_batches": 2, "ep": 1, "dp": 2,
        "dtype_bytes": 4, "micro_batch_sequences": 2, "seq_len": 32, "budget_bytes": 16 * MIB,
        "devices": [plan_device(0, 0, 16, "0-3", [1]), plan_device(1, 16, 32, "0-3", [0])]}
PLAN["max_total"] = max(d["total"] for d in PLAN["devices"])


def write_run(run: Path, with_memory: bool = True, plan: dict | str | None = PLAN) -> Path:
    """A run directory as the driver leaves it (metrics.jsonl, memory_plan.json), three steps on 2 devices."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            rec = {"step": step, "loss": 5.0 - step / 10, "grad_norm": 1.0, "lr": 1e-3, "tokens": 256,
                   "tokens_per_s": 1000.0 + step, "step_time_s": 0.25, "device_step_time_s": [0.2, 0.21],
                   "device_collective_s": [0.01, 0.01], "device_rss_mb": [381.5, 391.0]}
            if with_memory:
                rec["device_memory"] = memory_at(step)
            f.write(json.dumps(rec) + "\n")
    if isinstance(plan, dict):
        (run / "memory_plan.json").write_text(json.dumps(plan))
    elif isinstance(plan, str):
        (run / "memory_plan.json").write_text(plan)
    return run


class Page(HTMLParser):
    """The report's figures (id -> base64 PNG) and tables (id -> rows of cells: text and data-* attributes)."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: dict[str, str | None] = {}
        self.tables: dict[str, list[dict]] = {}
        self.headers: dict[str, list[str]] = {}
        self._fig = self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._fig = a.get("id")
            self.figures[self._fig] = None
        elif tag == "img" and self._fig:
            self.figures[self._fig] = a["src"].split("base64,", 1)[1]
        elif tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
            self.headers[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": a, "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"tag": tag, "text": "", "bytes": a.get("data-bytes")}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "figure":
            self._fig = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if all(c["tag"] == "th" for c in self._row["cells"]):
                self.headers[self._table] = [c["text"] for c in self._row["cells"]]
            else:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def bytes_rows(page: Page) -> dict[tuple[int, str], dict[str, int | None]]:
    """(device, measured|planned) -> column -> exact bytes (data-bytes) of the jigsaw's bytes table."""
    head = page.headers["jigsaw-bytes"]
    out = {}
    for row in page.tables["jigsaw-bytes"]:
        key = (int(row["attrs"]["data-device"]), row["attrs"]["data-source"])
        out[key] = {h: (int(c["bytes"]) if c["bytes"] is not None else None)
                    for h, c in zip(head, row["cells"]) if h not in ("device", "", "measured / planned")}
        out[key]["ratio"] = row["cells"][-1]["text"]
        out[key]["shown MiB"] = {h: c["text"] for h, c in zip(head, row["cells"])}
    return out


def test_report_draws_the_jigsaw_measured_beside_planned(tmp_path):
    run = write_run(tmp_path / "run")
    text = write_report(run).read_text()
    page = Page(text)
    assert list(page.figures) == list(FIGURES)   # every figure, the jigsaw last
    width, height = png_size(page.figures["jigsaw"])
    assert width > 300 and height > 150
    assert 'id="jigsaw-heading"' in text and "ZeRO stage 2" in text and "activation checkpointing selective" in text
    assert "budget 16.0 MiB per device" in text
    rows = bytes_rows(page)
    assert sorted(rows) == [(0, "measured"), (0, "planned"), (1, "measured"), (1, "planned")]
    for rank in (0, 1):
        m, p, want, plan = rows[rank, "measured"], rows[rank, "planned"], LAST[rank], PLAN["devices"][rank]
        # measured: the last record's device_memory (step 3), not an earlier one's
        assert {c: m[c] for c in ("params", "grads", "optimizer", "activations_peak")} == {
            c: want[c] for c in ("params", "grads", "optimizer", "activations_peak")}
        assert m["comm_buffers"] is None and m["host RSS"] == want["rss"]
        measured_total = want["params"] + want["grads"] + want["optimizer"] + want["activations_peak"]
        assert m["total"] == measured_total
        # planned: memory_plan.json's bytes, comm_buffers its own column, the plan's total
        assert {c: p[c] for c in ("params", "grads", "optimizer", "activations_peak", "comm_buffers", "total")} == {
            c: plan[c] for c in ("params", "grads", "optimizer", "activations_peak", "comm_buffers", "total")}
        assert p["host RSS"] is None
        planned_same = plan["params"] + plan["grads"] + plan["optimizer"] + plan["activations_peak"]
        assert m["ratio"] == f"{measured_total / planned_same:.1%}"
        # the cells show MiB
        assert m["shown MiB"]["optimizer"] == f"{want['optimizer'] / MIB:,.2f}"
        assert p["shown MiB"]["total"] == f"{plan['total'] / MIB:,.2f}"
    assert rows[0, "measured"]["ratio"] == "104.2%"    # 7,500,040 bytes measured, 7,194,352 planned
    # which slice of which tensor each device holds
    head = page.headers["jigsaw-holdings"]
    holdings = {int(r["cells"][0]["text"]): dict(zip(head, (c["text"] for c in r["cells"])))
                for r in page.tables["jigsaw-holdings"]}
    assert holdings[0]["dense slices"] == ("rows 0:16 of 32: 4 tensors (embed.weight, layers.0.attn.wq.weight, "
                                           "layers.0.attn.wk.weight, +1 more)")
    assert holdings[1]["dense slices"].startswith("rows 16:32 of 32: 4 tensors")
    assert holdings[0]["dense AdamW states"] == "its shards" and holdings[0]["dense replicas"] == "none"
    assert holdings[0]["experts"] == "0-3 of each of 2 MoE layers"
    assert holdings[0]["expert slices"] == "whole: 3 tensors (layers.1.moe.w1, layers.1.moe.w2, layers.1.moe.w3)"
    assert holdings[0]["expert AdamW states"] == "2 of 3: 2 tensors (layers.1.moe.w1, layers.1.moe.w3)"
    assert holdings[0]["same expert slices on"] == "device 1" and holdings[1]["same expert slices on"] == "device 0"


def test_a_run_without_device_memory_has_no_jigsaw(tmp_path):
    text = write_report(write_run(tmp_path / "old", with_memory=False)).read_text()
    page = Page(text)
    assert list(page.figures) == [f for f in FIGURES if f != "jigsaw"]
    assert "jigsaw" not in text


@pytest.mark.parametrize("plan", [None, "{not json", json.dumps([1, 2])], ids=["missing", "torn", "not-an-object"])
def test_without_a_usable_plan_the_jigsaw_shows_the_measured_bytes(tmp_path, plan):
    page = Page(write_report(write_run(tmp_path / "run", plan=plan)).read_text())
    rows = bytes_rows(page)
    assert sorted(rows) == [(0, "measured"), (1, "measured")]
    assert rows[1, "measured"]["activations_peak"] == LAST[1]["activations_peak"] and rows[1, "measured"]["ratio"] == ""
    assert "jigsaw-holdings" not in page.tables and png_size(page.figures["jigsaw"])[0] > 300


def test_a_plan_with_keys_absent_still_reports(tmp_path):
    """A plan from another version of the planner: no rank, total, holdings, budget or settings; one category."""
    plan = {"devices": [{"params": 123}, {"params": 456, "holdings": {"dense": {"whole": ["embed.weight"]}}}]}
    page = Page(write_report(write_run(tmp_path / "run", plan=plan)).read_text())
    rows = bytes_rows(page)
    assert rows[0, "planned"]["params"] == 123 and rows[0, "planned"]["total"] == 123
    assert rows[1, "planned"]["params"] == 456 and rows[1, "planned"]["grads"] is None
    measured = sum(LAST[0][c] for c in ("params", "grads", "optimizer", "activations_peak"))
    assert rows[0, "measured"]["ratio"] == f"{measured / 123:.1%}"
    head = page.headers["jigsaw-holdings"]
    cells = [dict(zip(head, (c["text"] for c in r["cells"]))) for r in page.tables["jigsaw-holdings"]]
    assert cells[0]["dense slices"] == "" and cells[1]["dense slices"] == "whole: 1 tensor (embed.weight)"


def test_the_planners_own_plan_is_read_as_written(tmp_path):
    """memory_plan.json as the driver writes it (planner.plan_memory(cfg).to_dict()): every planned byte and the
    first slice of every device's dense holdings reach the report."""
    from orchestrator.memory.plan import plan_memory
    from tests.conftest import tiny_config

    plan = plan_memory(tiny_config(None, "cluster.num_devices=2", "memory.zero_stage=2")).to_dict()
    text = write_report(write_run(tmp_path / "run", plan=plan)).read_text()
    page = Page(text)
    assert "ZeRO stage 2" in text and sorted(rows := bytes_rows(page)) == [
        (0, "measured"), (0, "planned"), (1, "measured"), (1, "planned")]
    head = page.headers["jigsaw-holdings"]
    holdings = [dict(zip(head, (c["text"] for c in r["cells"]))) for r in page.tables["jigsaw-holdings"]]
    for rank, d in enumerate(plan["devices"]):
        assert {c: rows[rank, "planned"][c] for c in ("params", "grads", "optimizer", "activations_peak",
                                                      "comm_buffers", "total")} == {
            c: d[c] for c in ("params", "grads", "optimizer", "activations_peak", "comm_buffers", "total")}
        first_slice, names = next(iter(d["holdings"]["dense"].items()))
        assert holdings[rank]["dense slices"].startswith(f"{first_slice}: {len(names)} tensor")


def test_tensorboard_sink_writes_each_devices_memory_in_mib(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orchestrator.monitoring.metrics import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb", histogram_every=0, first_step=1)
    for step in (1, 2, 3):
        sink.write({"step": step, "loss": 1.0, "device_memory": memory_at(step)})
    sink.close()
    tb = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {f"memory/device{r}/{c}" for r in (0, 1) for c in LAST[0]} <= tags
    for rank in (0, 1):
        for category in LAST[rank]:
            events = tb.Scalars(f"memory/device{rank}/{category}")
            assert [e.step for e in events] == [1, 2, 3]
            assert [e.value for e in events] == pytest.approx(
                [memory_at(s)[rank][category] / MIB for s in (1, 2, 3)], rel=1e-6)
    assert tb.Scalars("memory/device1/optimizer")[-1].value == pytest.approx(1_800_040 / MIB, rel=1e-6)


def test_prometheus_sink_sets_device_memory_bytes_by_device_and_category(monkeypatch):
    import ray.util.metrics

    made: dict[str, "FakeGauge"] = {}

    class FakeGauge:
        def __init__(self, name, description="", tag_keys=()):
            self.name, self.tag_keys, self.values = name, tag_keys, {}
            made[name] = self

        def set(self, value, tags=None):
            assert set(tags) == set(self.tag_keys), (self.name, tags)
            self.values[tuple(sorted(tags.items()))] = value

    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeGauge)
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeGauge)
    from orchestrator.monitoring.metrics import PrometheusSink

    sink = PrometheusSink("the-run")
    for step in (1, 2, 3):
        sink.write({"step": step, "loss": 1.0, "device_memory": memory_at(step)})
    gauge = made["orchestrator_device_memory_bytes"]
    assert set(gauge.tag_keys) == {"run", "device", "category"}
    assert gauge.values == {(("category", c), ("device", str(r)), ("run", "the-run")): float(LAST[r][c])
                            for r in (0, 1) for c in LAST[r]}


def test_status_json_devices_carry_their_last_measured_memory():
    def report(rank, memory):
        return SimpleNamespace(rank=rank, compute_time_s=0.2, collective_s=0.01, rss_bytes=400 * MIB,
                               device_mem_bytes=0, memory=memory)

    info = [{"pid": 11, "node_id": "n", "ip": "127.0.0.1"}, {"pid": 12}, {"pid": 13}]
    devices = device_status(info, [0, 1, 0], [report(0, LAST[0]), report(1, {})])
    assert devices[0]["memory"] == LAST[0] and devices[0]["memory"] is not LAST[0]
    assert devices[0]["memory"]["optimizer"] == 2_000_040 and devices[0]["rss_mb"] == 400
    assert devices[1]["memory"] is None and devices[1]["restarts"] == 1   # a report without a measurement
    assert devices[2]["memory"] is None and devices[2]["step_time_s"] is None   # no report yet
    json.dumps(devices)   # status.json takes it as it is
