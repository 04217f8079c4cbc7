"""`mdlens reproduce all --jobs N`: the analyses in worker processes, grouped as the stage table says,
and the report after them in the calling process (fake stages: each records where and when it ran)."""

import itertools
import json
import os
import textwrap

import pytest

from mdlens import cli

FAKE_STAGE = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path
    from types import SimpleNamespace

    IMPORTED = time.time()

    def run(out_dir, quick):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"name": __name__, "pid": os.getpid(), "imported": IMPORTED, "start": time.time(), "quick": quick}
        time.sleep(0.3)  # long enough that two groups overlap when they run side by side
        record["end"] = time.time()
        path = out_dir / f"{__name__}.json"
        path.write_text(json.dumps(record))
        return SimpleNamespace(files=[str(path)])
    """
)


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    modules.mkdir()
    for name in ("fake_a1", "fake_a2", "fake_b", "fake_report"):
        (modules / f"{name}.py").write_text(FAKE_STAGE)
    monkeypatch.syspath_prepend(str(modules))  # spawned workers start with the parent's sys.path
    table = {
        "a1": cli.Stage("fake_a1", "first of group a", "fake_a1.json", group="a"),
        "b": cli.Stage("fake_b", "group b alone", "fake_b.json", group="b"),
        "a2": cli.Stage("fake_a2", "second of group a", "fake_a2.json", group="a"),
        "report": cli.Stage("fake_report", "the report"),
    }
    monkeypatch.setattr(cli, "REPRODUCTIONS", table)
    return tmp_path / "out"


def read(out, folder, module):
    return json.loads((out / folder / f"{module}.json").read_text())


def test_jobs_run_each_group_in_its_own_process_and_the_report_last(fake_stages):
    out = fake_stages
    cli.main(["reproduce", "all", "--out", str(out), "--quick", "--jobs", "2"])
    a1, a2, b = read(out, "a1", "fake_a1"), read(out, "a2", "fake_a2"), read(out, "b", "fake_b")
    report = read(out, ".", "fake_report")
    assert a1["pid"] == a2["pid"] != b["pid"]  # a group shares one process; groups run apart
    assert os.getpid() not in (a1["pid"], b["pid"]) and report["pid"] == os.getpid()
    assert a1["end"] <= a2["start"]  # a group's stages in table order
    assert b["start"] < a1["end"] and a1["start"] < b["end"]  # the two groups overlapped in time
    assert report["start"] >= max(a2["end"], b["end"]) and report["quick"] is True
    assert report["imported"] < max(a2["end"], b["end"])  # its imports overlapped the workers' stages


def test_jobs_start_the_longest_groups_first(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    modules.mkdir()
    for name in ("fake_short", "fake_middle", "fake_long", "fake_report"):
        (modules / f"{name}.py").write_text(FAKE_STAGE)
    monkeypatch.syspath_prepend(str(modules))
    table = {  # in table order the longest group comes last
        "short": cli.Stage("fake_short", "short", "fake_short.json", seconds=1.0),
        "middle": cli.Stage("fake_middle", "middle", "fake_middle.json", seconds=5.0),
        "long": cli.Stage("fake_long", "long", "fake_long.json", seconds=10.0),
        "report": cli.Stage("fake_report", "the report"),
    }
    monkeypatch.setattr(cli, "REPRODUCTIONS", table)
    out = tmp_path / "out"
    cli.main(["reproduce", "all", "--out", str(out), "--jobs", "2"])
    short, middle, long = (read(out, name, f"fake_{name}") for name in ("short", "middle", "long"))
    # Two workers: the long and the middle group start together, the short one when a worker is free.
    assert long["start"] < middle["end"] and middle["start"] < long["end"]
    assert short["start"] >= min(long["end"], middle["end"])


def test_one_job_runs_everything_here_in_table_order(fake_stages):
    out = fake_stages
    cli.main(["reproduce", "all", "--out", str(out), "--jobs", "1"])
    records = [read(out, "a1", "fake_a1"), read(out, "b", "fake_b"), read(out, "a2", "fake_a2")]
    assert {r["pid"] for r in records} == {os.getpid()}
    assert [r["end"] <= s["start"] for r, s in itertools.pairwise(records)] == [True, True]


FAILING_STAGE = textwrap.dedent(
    """
    def run(out_dir, quick):
        raise RuntimeError("boom in a worker")
    """
)


def test_a_failing_group_stops_the_run_at_once(tmp_path, monkeypatch):
    """The failure is raised with the worker's own exception while the other group still runs, and
    that group is stopped (it never writes its file)."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "fake_slow.py").write_text(FAKE_STAGE.replace("time.sleep(0.3)", "time.sleep(5)"))
    (modules / "fake_failing.py").write_text(FAILING_STAGE)
    (modules / "fake_report.py").write_text(FAKE_STAGE)
    monkeypatch.syspath_prepend(str(modules))
    table = {
        "slow": cli.Stage("fake_slow", "slow", "fake_slow.json", seconds=10.0),
        "failing": cli.Stage("fake_failing", "fails", "fake_failing.json", seconds=1.0),
        "report": cli.Stage("fake_report", "the report"),
    }
    monkeypatch.setattr(cli, "REPRODUCTIONS", table)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom in a worker"):
        cli.main(["reproduce", "all", "--out", str(out), "--jobs", "2"])
    assert not (out / "slow" / "fake_slow.json").exists() and not (out / "fake_report.json").exists()
