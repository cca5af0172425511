"""Bad input fails fast with one line (exit 2), never a traceback or a silent exit 0 (issue 10, item 5)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3prl_stimulus.cli import main
from s3prl_stimulus.errors import StimulusError

REPO = Path(__file__).resolve().parents[1]
RUN_PAPER = REPO / "recipes" / "run_paper.sh"


def one_line_error(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines, stderr
    assert all(fragment in lines[-1] for fragment in fragments), lines[-1]


# ---- the recipe's shell front end


@pytest.mark.parametrize("options,fragment", [
    (["--stage", "x"], "--stage x: give a stage number from 0 to 4"),
    (["--stop_stage", "9"], "--stop_stage 9"),
    (["--stage", "3", "--stop_stage", "1"], "comes before --stage 3"),
    (["--ngpu", "two"], "--ngpu two"),
    (["--preflight", "yes"], "--preflight yes: true or false"),
])
def test_run_paper_sh_refuses_bad_numbers_instead_of_running_nothing(tmp_path, options, fragment):
    result = subprocess.run(["bash", str(RUN_PAPER), "--expdir", str(tmp_path / "exp"), "--dry_run", "true", *options],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    one_line_error(result.stderr, fragment)
    assert not (tmp_path / "exp").exists()


# ---- seeds


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf"])
def test_sweep_refuses_a_save_interval_that_is_not_seconds(tmp_path, capsys, seconds):
    assert main(["sweep", "--cache", str(tmp_path), "--out", str(tmp_path / "out"), "--save-every", seconds]) == 2
    one_line_error(capsys.readouterr().err, "--save-every")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_sweep_refuses_a_seed_numpy_cannot_take(tmp_path, capsys, seed):
    assert main(["sweep", "--cache", str(tmp_path), "--out", str(tmp_path / "out"), "--seeds", "1", seed]) == 2
    one_line_error(capsys.readouterr().err, f"--seeds {seed}: seeds must be from 0 to")
    assert not (tmp_path / "out").exists()


def test_recipe_refuses_negative_seeds():
    from s3prl_stimulus.study.recipe.settings import check_seeds

    assert check_seeds("1337,7") == (1337, 7)
    with pytest.raises(StimulusError, match=r"--seeds -3: seeds must be from 0 to 4294967295"):
        check_seeds("1,-3")


@pytest.mark.parametrize("seed_args,fragment", [
    (["--seed", "-7"], "--seed -7: seeds must be from 0"),
    (["-o", "config.runner.total_steps=2,,args.seed=-7"], "-o args.seed -7: seeds must be from 0"),
])
def test_launcher_refuses_a_negative_seed_before_s3prl_starts(tmp_path, seed_args, fragment):
    result = subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", "-m", "train", "-d", "emotion_stimulus",
                             "-u", "fbank", "-p", str(tmp_path / "exp"), *seed_args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, fragment)
    assert not (tmp_path / "exp").exists()


# ---- damaged checkpoints


def test_auto_resume_refuses_a_truncated_latest_checkpoint_and_names_the_earlier_one(tmp_path):
    from s3prl_stimulus.integration.launcher import check_inputs

    expdir = tmp_path / "exp"
    expdir.mkdir()
    for step in (10, 20):
        torch.save({"Step": step, "weights": torch.zeros(1000)}, expdir / f"states-{step}.ckpt")
    check_inputs(["-m", "train", "-a", "-p", str(expdir)])  # both intact: S3PRL may resume
    latest = expdir / "states-20.ckpt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # killed mid-write
    with pytest.raises(StimulusError, match=r"states-20\.ckpt, which is damaged .*delete it to resume from states-10\.ckpt"):
        check_inputs(["-m", "train", "-a", "-p", str(expdir)])
    (expdir / "states-10.ckpt").unlink()
    with pytest.raises(StimulusError, match="delete it to restart the run"):
        check_inputs(["-m", "train", "-a", "-p", str(expdir)])


def test_launcher_reports_the_damaged_checkpoint_in_one_line(tmp_path):
    expdir = tmp_path / "exp"
    expdir.mkdir()
    (expdir / "states-70.ckpt").write_bytes(b"PK\x03\x04 cut short")
    result = subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", "-m", "train", "-a", "-d",
                             "emotion_stimulus", "-u", "fbank", "-p", str(expdir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, "states-70.ckpt, which is damaged", "delete it to restart the run")


# ---- output directories that cannot be written


@pytest.fixture()
def not_a_directory(tmp_path) -> Path:
    """An output path under a regular file: unwritable for every user, root included."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder\n")
    return blocker / "out"


@pytest.mark.parametrize("command", [
    ["labels", "--out", "{out}"],
    ["report", "{results}", "--out", "{out}"],
    ["download", "--to", "{out}", "--base-url", "http://127.0.0.1:9/"],
    ["extract", "--corpus", "{results}", "-u", "fbank", "--out", "{out}"],
    ["sweep", "--cache", "{results}", "--out", "{out}"],
])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, not_a_directory, command):
    argv = [a.format(out=not_a_directory, results=tmp_path) for a in command]
    option = "--to" if command[0] == "download" else "--out"
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, f"{option} {not_a_directory}:", "is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_output_directory_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["labels", "--out", str(locked / "labels")]) == 2
    one_line_error(capsys.readouterr().err, "cannot write in", "choose a writable --out")


def test_launcher_refuses_an_unwritable_expdir(tmp_path, not_a_directory):
    result = subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", "-m", "train", "-d", "emotion_stimulus",
                             "-u", "fbank", "-p", str(not_a_directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, f"-p {not_a_directory}:", "is not a directory")


def test_a_file_system_failure_mid_command_is_one_line(monkeypatch, tmp_path, capsys):
    import s3prl_stimulus.commands.labels as labels_command

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "labels_1.csv"))

    monkeypatch.setattr(labels_command, "write_label_files", disk_full)
    assert main(["labels", "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, "labels_1.csv: No space left on device")


# ---- upstream weights that cannot be fetched


@pytest.mark.parametrize("upstream,instead", [("wavlm_large", "-u wavlm_local -k FILE"), ("vq_apc", "-u apc_local -k FILE")])
def test_launcher_turns_a_failed_weights_download_into_one_line(monkeypatch, capsys, upstream, instead):
    import types
    import urllib.error

    pytest.importorskip("s3prl")
    requests = pytest.importorskip("requests")
    fake = types.ModuleType("s3prl.run_downstream")
    fake.__file__ = "/s3prl/run_downstream.py"

    def offline_download():
        try:  # what S3PRL's download helper does offline: urllib fails, then its requests fallback
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        except urllib.error.URLError:
            raise requests.exceptions.ConnectionError("Max retries exceeded with url: /wavlm_large.pt")

    fake.main = offline_download
    monkeypatch.setitem(sys.modules, "s3prl.run_downstream", fake)
    monkeypatch.setattr(sys, "argv", ["launcher"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from s3prl_stimulus.integration import launcher

    assert launcher.main(["-m", "train", "-d", "emotion_stimulus", "-u", upstream, "-p", str(Path("/tmp") / "x")]) == 2
    one_line_error(capsys.readouterr().err, f"the weights of upstream {upstream} could not be fetched",
                   "ConnectionError", instead)


def test_other_failures_inside_s3prl_still_raise():
    from s3prl_stimulus.integration.hub_entries import fetch_failure

    assert fetch_failure(RuntimeError("CUDA out of memory"), "wavlm_large") is None
    assert "could not be fetched" in fetch_failure(TimeoutError("timed out"), "tera")  # socket.timeout


def test_extract_turns_a_failed_weights_download_into_one_line(monkeypatch):
    import types
    import urllib.error

    from s3prl_stimulus.cache import upstream as cache_upstream

    def wavlm_large(**kwargs):
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(cache_upstream, "import_hub", lambda: types.SimpleNamespace(wavlm_large=wavlm_large))
    monkeypatch.setattr(cache_upstream, "check_upstream_name", lambda hub, name: None)
    with pytest.raises(StimulusError, match=r"weights of upstream wavlm_large could not be fetched .*-u wavlm_local -k FILE"):
        cache_upstream.build_upstream(cache_upstream.UpstreamSpec("wavlm_large"), "cpu")
