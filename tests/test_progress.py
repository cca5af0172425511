"""Progress where it lands: heartbeat lines in logs (extract, sweep, download) and per-job progress on the
recipe's console (issue 10, item 4)."""

import re
import sys
from pathlib import Path

import pytest

from s3prl_stimulus import progress

LINE = re.compile(r"^(?P<desc>.+): (?P<n>\d+)/(?P<total>\d+) steps, [\d.]+ steps/s, (?P<tail>ETA .+|done in .+)$")


def test_duration_reads_as_words():
    assert [progress.duration(s) for s in (4.4, 187, 7500)] == ["4 s", "3 min 07 s", "2 h 05 min"]


def test_track_writes_heartbeat_lines_on_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # every update; pytest's stderr is not a terminal
    assert list(progress.track(range(5), 5, "sweep 20 runs", "step")) == [0, 1, 2, 3, 4]
    lines = [LINE.match(line) for line in capsys.readouterr().err.splitlines()]
    assert all(lines) and [int(m["n"]) for m in lines] == [1, 2, 3, 4, 5, 5]
    assert lines[0]["desc"] == "sweep 20 runs" and lines[0]["tail"].startswith("ETA")
    assert lines[-1]["tail"].startswith("done in")


def test_nothing_is_written_when_disabled(capsys):
    assert list(progress.track(range(3), 3, "x", "step", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_the_recipe_console_shows_a_running_jobs_latest_log_line(tmp_path, monkeypatch):
    from s3prl_stimulus.study.recipe import local

    monkeypatch.setattr(local, "PROGRESS_EVERY_S", 0.2)
    script = ("import sys, time\n"
              "for i in range(1, 4):\n"
              "    print(f'extract fbank fold1: {i}/3 clips, 1.0 clips/s, ETA {3 - i} s', file=sys.stderr, flush=True)\n"
              "    time.sleep(0.5)\n")
    job = local.Job("cache/fbank", "cache fbank", tmp_path / "logs" / "fbank.log", [[sys.executable, "-c", script]])
    reports = []
    outcomes = local.run_local([job], report=reports.append)
    assert outcomes[0].ok
    running = [r for r in reports if ": running for " in r]
    assert running and all(r.startswith("[1/1] cache fbank: running for ") for r in running)
    assert any(re.search(r"extract fbank fold1: [123]/3 clips", r) for r in running)
    assert reports[0].startswith("[1/1] cache fbank: started") and reports[-1].startswith("[1/1] cache fbank: done")
    assert "extract fbank fold1: 3/3 clips" in Path(job.log).read_text()


def test_recipe_cache_jobs_no_longer_silence_their_progress(tmp_path):
    from s3prl_stimulus.study.recipe import plan, settings as recipe_settings

    argv = ["train", "--path", "cache", "--root", str(tmp_path / "exp"), "--corpus", str(tmp_path),
            "--upstreams", "fbank"]
    from s3prl_stimulus.study.recipe.cli import build_parser

    args = build_parser().parse_args(argv)
    s = recipe_settings.make_settings(args)
    upstream = s.upstreams[0]
    assert "--no-progress" not in plan.extract_command(s, upstream, [1])
    assert "--no-progress" not in plan.sweep_command(s, upstream, ["voice"], [1], [1337])
