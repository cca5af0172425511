"""`s3prl-stimulus doctor`: one ✓/✗ line per check, exit status 0 only when all pass, a fix on every ✗.

Doctor runs as a user runs it (a subprocess), offline: HOME points at a temporary directory, so S3PRL's download
cache is empty or holds a tiny checkpoint under a released URL's name, and a proxy nobody listens on stops
any download attempt. The three smoke runs (fbank; a cached hub name; a local checkpoint) share two cores.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from s3prl_stimulus import doctor
from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS, cached_weights_path, paper_upstream

needs_s3prl = pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_doctor(home, *args, env=None, code=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "s3prl_stimulus", "doctor", *map(str, args)]
    environment = dict(os.environ, HOME=str(home), TMPDIR=str(home), **OFFLINE, **(env or {}))  # kept logs land in home
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def lines_of(run) -> list:
    lines = run.stdout.splitlines()
    assert lines and all(line[:2] in ("✓ ", "✗ ") for line in lines), run.stdout + run.stderr[-2000:]
    return lines


def line_starting(lines, prefix) -> str:
    [line] = [line for line in lines if line[2:].startswith(prefix)]
    return line


# ---------------------------------------------------------------- pure parts


def test_a_line_is_a_mark_the_check_and_the_fix_only_when_it_failed():
    assert doctor.Check(True, "torch 2.13", "never shown").line() == "✓ torch 2.13"
    assert doctor.Check(False, "S3PRL: does not import", "pip install s3prl").line() == \
        "✗ S3PRL: does not import — fix: pip install s3prl"


def test_the_exit_status_is_zero_only_when_every_check_passed(monkeypatch, tmp_path):
    printed = []
    workdirs = iter([tmp_path / "passed", tmp_path / "failed"])
    monkeypatch.setattr(doctor.tempfile, "mkdtemp", lambda prefix: str(next(workdirs)))
    for workdir in (tmp_path / "passed", tmp_path / "failed"):
        workdir.mkdir()
    monkeypatch.setattr(doctor, "checks", lambda request, workdir: iter([doctor.Check(True, "a"), doctor.Check(True, "b")]))
    assert doctor.run(doctor.Request(), report=printed.append) == 0
    monkeypatch.setattr(doctor, "checks",
                        lambda request, workdir: iter([doctor.Check(True, "a"), doctor.Check(False, "b", "fix")]))
    assert doctor.run(doctor.Request(), report=printed.append) == 1
    assert printed == ["✓ a", "✓ b", "✓ a", "✗ b — fix: fix"]
    assert not (tmp_path / "passed").exists() and (tmp_path / "failed").is_dir()  # logs kept only after a failure


def test_an_upstream_line_says_whether_its_weights_are_cached(tmp_path, monkeypatch):
    import s3prl_stimulus.integration.upstreams as upstreams

    monkeypatch.setattr(upstreams, "download_dir", lambda: tmp_path)
    apc = paper_upstream("apc")
    assert doctor.upstream_check(apc).line() == (
        "✓ apc (APC): 3 hidden states × 512 at 100 frames/s, 4.1 M parameters; local entry apc_local -k FILE; "
        "not cached: about 16 MB from huggingface.co at first use")
    cached_weights_path(apc.url).write_bytes(b"x" * 2_000_000)
    assert doctor.upstream_check(apc).line().endswith(f"weights cached: {cached_weights_path(apc.url)} (2 MB)")
    assert doctor.upstream_check(paper_upstream("fbank")).line() == (
        "✓ fbank (FBANK): 1 hidden state × 240 at 100 frames/s; computed from the waveform, nothing to download")


def test_tera_and_mockingjay_need_distutils(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distutils" else real(name, *a))
    line = doctor.upstream_check(paper_upstream("tera")).line()
    assert line.startswith("✗ tera (TERA)") and line.endswith("— fix: pip install setuptools (it provides distutils)")
    assert doctor.upstream_check(paper_upstream("wav2vec")).ok


# ---------------------------------------------------------------- broken stacks


@needs_s3prl
def test_a_broken_s3prl_is_a_failed_line_with_the_install_fix(tmp_path):
    fake = tmp_path / "site" / "s3prl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('s3prl is broken here')\n")
    run = run_doctor(tmp_path, "--no-smoke", env={"PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 1
    lines = lines_of(run)
    assert line_starting(lines, "S3PRL:") == (
        f"✗ S3PRL: does not import (ImportError: s3prl is broken here) — fix: {doctor.INSTALL}")
    assert line_starting(lines, "upstream build and smoke run").startswith("✗ upstream build and smoke run: not run without")
    assert line_starting(lines, "torch ").startswith("✓") and line_starting(lines, "Python ").startswith("✓")
    assert sum(line.startswith("✓ ") and " hidden state" in line for line in lines) == 15  # the table needs no S3PRL


def test_a_missing_s3prl_is_a_failed_line_with_the_install_fix(tmp_path):
    code = ("import sys; sys.modules['s3prl'] = None\n"  # as if S3PRL were not installed
            "from s3prl_stimulus.cli import main; sys.exit(main(['doctor', '--no-smoke']))")
    run = run_doctor(tmp_path, code=code)
    assert run.returncode == 1
    lines = lines_of(run)
    assert line_starting(lines, "S3PRL:").endswith(f"— fix: {doctor.INSTALL}")
    shims = line_starting(lines, "shims:")
    assert shims.startswith("✗ shims: the stack cannot be prepared") and "pip install" in shims


@needs_s3prl
def test_an_uncached_upstream_is_not_downloaded_without_download(tmp_path):
    run = run_doctor(tmp_path, "-u", "apc")
    assert run.returncode == 1
    lines = lines_of(run)
    assert line_starting(lines, "apc: weights not") == (
        "✗ apc: weights not in S3PRL's download cache, nothing downloaded — fix: add --download (about 16 MB), "
        "or pass -u apc_local -k FILE")
    assert line_starting(lines, "smoke run with apc").startswith("✗ smoke run with apc: not run")
    assert not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------- full runs, offline


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Three doctor runs: fbank (nothing cached), wavlm_large by hub name from the download cache, and
    wavlm_local with the same tiny file as -k."""
    from s3prl_stimulus.testing_upstreams import make_paper_checkpoint

    empty, cached = tmp_path_factory.mktemp("empty_home"), tmp_path_factory.mktemp("cached_home")
    tiny = make_paper_checkpoint("wavlm_large", tmp_path_factory.mktemp("tiny") / "wavlm_large.pt")
    target = cached_weights_path(paper_upstream("wavlm_large").url, cached / ".cache" / "s3prl" / "download")
    target.parent.mkdir(parents=True)
    shutil.copyfile(tiny, target)
    runs = {"fbank": (empty, []), "wavlm_large": (cached, ["-u", "wavlm_large"]),
            "wavlm_local": (cached, ["-u", "wavlm_local", "-k", tiny])}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda item: (item[0], run_doctor(item[1][0], *item[1][1])), runs.items())
        return dict(done)


def assert_smoke_run_passed(lines, upstream):
    assert line_starting(lines, f"S3PRL path: 4 training steps of {upstream} on cpu").startswith("✓")
    assert line_starting(lines, "S3PRL path: -m evaluate dev-best.ckpt").startswith("✓")
    assert line_starting(lines, "cache path: extracted").startswith("✓")
    agree = line_starting(lines, "the two paths agree on the 6 test clips")
    difference = float(re.search(r"largest probability difference (\S+) ", agree).group(1))
    assert agree.startswith("✓") and difference <= doctor.AGREEMENT


@needs_s3prl
def test_doctor_passes_offline_with_fbank_and_lists_every_paper_upstream(full_runs):
    run = full_runs["fbank"]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    lines = lines_of(run)
    assert line_starting(lines, "S3PRL 0.4.18 (").startswith("✓")
    assert line_starting(lines, "CUDA").startswith("✓ CUDA")
    assert line_starting(lines, "S3PRL finds -d emotion_stimulus").startswith("✓")
    for upstream in PAPER_UPSTREAMS:
        line = line_starting(lines, f"{upstream.name} ({upstream.title}): ")
        assert f"{upstream.hidden_states} hidden state" in line and f"× {upstream.dim} " in line
        if upstream.url:
            assert f"local entry {upstream.local} -k FILE" in line and f"about {upstream.weights_mb} MB" in line
    assert not any("built on" in line for line in lines)  # fbank needs no build check
    assert_smoke_run_passed(lines, "fbank")
    assert "Downloading" not in run.stderr


@needs_s3prl
def test_doctor_builds_a_cached_hub_upstream_offline_and_smoke_runs_it(full_runs):
    run = full_runs["wavlm_large"]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    lines = lines_of(run)
    assert "weights cached:" in line_starting(lines, "wavlm_large (WavLM Large)")
    built = line_starting(lines, "wavlm_large built on cpu")
    assert "25 hidden states × 16 at 50 frames/s" in built and built.endswith("(released: × 1024)")
    assert_smoke_run_passed(lines, "wavlm_large")


@needs_s3prl
def test_doctor_smoke_runs_a_local_checkpoint(full_runs):
    run = full_runs["wavlm_local"]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    lines = lines_of(run)
    assert "25 hidden states × 16 at 50 frames/s" in line_starting(lines, "wavlm_local built on cpu")
    assert_smoke_run_passed(lines, "wavlm_local")
