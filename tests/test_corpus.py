"""download / verify against a loopback HTTP server that serves generated clips (never the internet)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from s3prl_stimulus import cli
from s3prl_stimulus.study.corpus import download_corpus, part_path, verify_corpus

CLIPS = ("1001_DFA_ANG_XX", "1001_DFA_DIS_XX", "1002_IEO_HAP_HI", "1076_MTI_SAD_XX")


def wav_bytes(seconds: float, seed: int, samplerate: int = 16000, channels: int = 1, silent: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    frames = int(seconds * samplerate)
    samples = np.zeros((frames, channels), np.int16) if silent else rng.integers(-8000, 8000, (frames, channels), dtype=np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, samplerate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def write_manifest(path: Path, files: dict) -> Path:
    rows = [{"clip": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class Server:
    """Serves ``files`` (clip -> bytes) under /AudioWAV/, with Range support and injectable faults."""

    def __init__(self, files: dict):
        self.files = dict(files)
        self.truncate: dict = {}  # clip -> bytes to send before dropping the connection (once)
        self.requests: list = []  # (clip, Range header or None)
        self.reject_ranges = False  # answer every Range request with 416
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                clip = Path(self.path).name.removesuffix(".wav")
                byte_range = self.headers.get("Range")
                state.requests.append((clip, byte_range))
                if clip not in state.files:
                    self.send_error(404, "Not Found")
                    return
                data, start = state.files[clip], 0
                if byte_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
                    if start >= len(data) or state.reject_ranges:
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = state.truncate.pop(clip, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/AudioWAV/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def gets(self, clip: str) -> list:
        return [r for c, r in self.requests if c == clip]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setattr("s3prl_stimulus.study.corpus.RETRY_BACKOFF_S", 0.01)
    files = {clip: wav_bytes(0.5 + 0.25 * i, seed=i) for i, clip in enumerate(CLIPS)}
    server = Server(files)
    manifest = write_manifest(tmp_path / "manifest.csv", files)
    yield server, manifest, files
    server.close()


def download(capsys, server, manifest, dest, *extra) -> tuple[int, str]:
    argv = ["download", "--to", str(dest), "--base-url", server.url, "--manifest", str(manifest),
            "--workers", "2", "--quiet", "--retries", "0", *extra]
    code = cli.main(argv)
    return code, capsys.readouterr().out


def assert_corpus_equals(dest: Path, files: dict):
    for clip, data in files.items():
        assert (dest / f"{clip}.wav").read_bytes() == data
    assert not list(dest.glob(".*.part"))


def test_download_verifies_and_rerun_fetches_nothing(served, tmp_path, capsys):
    server, manifest, files = served
    dest = tmp_path / "AudioWAV"
    code, out = download(capsys, server, manifest, dest)
    assert code == 0, out
    assert_corpus_equals(dest, files)
    assert re.search(r"downloaded and verified:\s+4", out)
    before = len(server.requests)
    code, out = download(capsys, server, manifest, dest)
    assert code == 0
    assert len(server.requests) == before  # nothing fetched again
    assert re.search(r"already present and verified:\s+4", out)


def test_resume_after_interrupted_transfer(served, tmp_path, capsys):
    server, manifest, files = served
    dest = tmp_path / "AudioWAV"
    clip = CLIPS[2]
    server.truncate[clip] = 5000
    code, out = download(capsys, server, manifest, dest)
    assert code == 1
    assert f"{clip}: transfer interrupted after 5000 of {len(files[clip])} bytes" in out
    assert not (dest / f"{clip}.wav").exists()  # never a half-written file under the final name
    assert part_path(dest, clip).stat().st_size == 5000
    code, out = download(capsys, server, manifest, dest)
    assert code == 0, out
    assert server.gets(clip)[-1] == "bytes=5000-"  # continued, not restarted
    assert re.search(r"resumed partial transfers:\s+1", out)
    assert_corpus_equals(dest, files)


def test_interrupted_transfer_is_retried_within_a_run(served, tmp_path):
    server, manifest, files = served
    clip = CLIPS[0]
    server.truncate[clip] = 100
    summary = download_corpus(tmp_path / "w", base_url=server.url, manifest=manifest, workers=2, retries=1, progress=False)
    assert summary.ok
    assert server.gets(clip) == [None, "bytes=100-"]
    assert_corpus_equals(tmp_path / "w", files)


def test_rejected_resume_starts_over(served, tmp_path):
    server, manifest, files = served
    clip = CLIPS[1]
    dest = tmp_path / "w"
    dest.mkdir()
    part_path(dest, clip).write_bytes(b"not a prefix of the real file")
    server.reject_ranges = True
    summary = download_corpus(dest, [clip], base_url=server.url, manifest=manifest, retries=1, progress=False)
    assert summary.ok and server.gets(clip) == ["bytes=29-", None]
    assert (dest / f"{clip}.wav").read_bytes() == files[clip] and not part_path(dest, clip).exists()


def test_corrupted_and_truncated_files_are_fetched_again(served, tmp_path, capsys):
    server, manifest, files = served
    dest = tmp_path / "AudioWAV"
    assert download(capsys, server, manifest, dest)[0] == 0
    flipped = bytearray(files[CLIPS[1]])
    flipped[-1] ^= 0xFF  # same size, wrong bytes: only the checksum can tell
    (dest / f"{CLIPS[1]}.wav").write_bytes(bytes(flipped))
    (dest / f"{CLIPS[3]}.wav").write_bytes(files[CLIPS[3]][:100])
    before = len(server.requests)
    code, out = download(capsys, server, manifest, dest)
    assert code == 0, out
    assert sorted(c for c, _ in server.requests[before:]) == sorted([CLIPS[1], CLIPS[3]])
    assert re.search(r"replaced \(were wrong\):\s+2", out)
    assert_corpus_equals(dest, files)


def test_404_is_reported_per_clip_with_nonzero_exit(served, tmp_path, capsys):
    server, manifest, files = served
    gone = CLIPS[1]
    del server.files[gone]
    dest = tmp_path / "AudioWAV"
    code, out = download(capsys, server, manifest, dest, "--format", "json")
    assert code == 1
    summary = json.loads(out)
    assert summary["counts"]["failed"] == 1 and summary["counts"]["downloaded"] == 3
    [failure] = summary["failures"]
    assert failure["clip"] == gone and "HTTP 404" in failure["error"]
    assert len(server.gets(gone)) == 1  # a 404 is not retried
    assert not (dest / f"{gone}.wav").exists() and not part_path(dest, gone).exists()


def test_wrong_bytes_from_server_are_never_kept(served, tmp_path):
    server, manifest, files = served
    clip = CLIPS[0]
    server.files[clip] = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n".ljust(len(files[clip]), b" ")
    summary = download_corpus(tmp_path / "w", base_url=server.url, manifest=manifest, workers=1, retries=1, progress=False)
    [failure] = summary.failures
    assert failure.clip == clip and "Git LFS pointer" in failure.detail
    assert len(server.gets(clip)) == 2
    assert not (tmp_path / "w" / f"{clip}.wav").exists() and not part_path(tmp_path / "w", clip).exists()


def test_unknown_clip_is_a_one_line_error(served, tmp_path, capsys):
    server, manifest, _ = served
    code = cli.main(["download", "--to", str(tmp_path / "w"), "--base-url", server.url, "--manifest", str(manifest),
                     "--clips", "9999_XXX_ANG_XX", "--quiet"])
    assert code == 2
    assert "not in the manifest" in capsys.readouterr().err
    assert not server.requests


def make_corpus(directory: Path, files: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for clip, data in files.items():
        (directory / f"{clip}.wav").write_bytes(data)


def test_verify_accepts_a_good_corpus_and_flags_silent_and_known_clips(tmp_path, capsys):
    files = {clip: wav_bytes(0.3, seed=i) for i, clip in enumerate(CLIPS[:3])}
    files["1076_MTI_SAD_XX"] = wav_bytes(0.3, seed=9, silent=True)
    files["1002_DFA_FEA_XX"] = wav_bytes(0.3, seed=8) [:44] + bytes(len(wav_bytes(0.3, seed=8)) - 44)  # all-zero samples
    manifest = write_manifest(tmp_path / "m.csv", files)
    corpus = tmp_path / "AudioWAV"
    make_corpus(corpus, files)
    code = cli.main(["verify", "--corpus", str(corpus), "--manifest", str(manifest), "--format", "json", "--workers", "2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["usable"] is True
    assert report["counts"]["ok"] == 5
    flagged = {f["clip"]: f["flags"] for f in report["flagged"]}
    assert set(flagged) == {"1076_MTI_SAD_XX", "1002_DFA_FEA_XX"}
    assert any(f.startswith("known issue") for f in flagged["1076_MTI_SAD_XX"])
    assert any(f.startswith("silent") for f in flagged["1076_MTI_SAD_XX"])
    assert flagged["1002_DFA_FEA_XX"] == ["silent: RMS -inf dBFS < -60 dBFS"]


def test_verify_reports_each_kind_of_problem(tmp_path, capsys):
    files = {clip: wav_bytes(0.3, seed=i) for i, clip in enumerate(CLIPS)}
    files["1002_IEO_HAP_HI"] = wav_bytes(0.3, seed=5, channels=2)  # right checksum, wrong format
    files["1001_DFA_DIS_XX"] = wav_bytes(0.3, seed=6, samplerate=8000)
    manifest = write_manifest(tmp_path / "m.csv", files)
    corpus = tmp_path / "AudioWAV"
    make_corpus(corpus, files)
    (corpus / "1076_MTI_SAD_XX.wav").unlink()
    tampered = bytearray(files["1001_DFA_ANG_XX"])
    tampered[100] ^= 1
    (corpus / "1001_DFA_ANG_XX.wav").write_bytes(bytes(tampered))
    (corpus / ".1076_MTI_SAD_XX.wav.part").write_bytes(b"xx")
    report = verify_corpus(corpus, manifest=manifest, workers=2)
    assert not report.usable
    status = {c.clip: (c.status, c.detail) for c in report.checks}
    assert status["1076_MTI_SAD_XX"][0] == "missing"
    assert status["1001_DFA_ANG_XX"][0] == "checksum"
    assert status["1002_IEO_HAP_HI"] == ("format", "2 channels; expected WAV 16000 Hz mono PCM_16")
    assert status["1001_DFA_DIS_XX"] == ("format", "8000 Hz; expected WAV 16000 Hz mono PCM_16")
    assert report.partial_files == [".1076_MTI_SAD_XX.wav.part"]
    assert verify_corpus(corpus, manifest=manifest, checksum=False).counts()["checksum"] == 0
    code = cli.main(["verify", "--corpus", str(corpus), "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert code == 1 and "NOT usable" in out and "1001_DFA_ANG_XX: checksum" in out


# ---- offline machines and logs (issue 10, item 3)


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens: every connection is refused at once."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/AudioWAV/"


def test_an_unreachable_host_stops_the_download_in_one_line(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.setattr("s3prl_stimulus.study.corpus.RETRY_BACKOFF_S", 0.2)
    files = {f"10{10 + i}_DFA_ANG_XX": wav_bytes(0.5, seed=i) for i in range(40)}
    manifest = write_manifest(tmp_path / "manifest.csv", files)
    url = closed_port_url()
    started = time.monotonic()
    code = cli.main(["download", "--to", str(tmp_path / "AudioWAV"), "--base-url", url, "--manifest", str(manifest),
                     "--workers", "2", "--retries", "3", "--quiet"])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach 127.0.0.1" in lines[0] and "8 connections in a row failed" in lines[0]
    assert "--base-url" in lines[0] and "s3prl-stimulus verify" in lines[0]
    # 40 clips x 4 attempts with back-off would take over a minute; it stops after the first 8 failures
    assert elapsed < 10
    assert not list((tmp_path / "AudioWAV").glob("*.wav"))


def test_one_unreachable_answer_among_good_ones_does_not_stop_the_download(served, tmp_path, capsys):
    from s3prl_stimulus.study import corpus

    server, manifest, files = served
    watch = corpus._HostWatch(limit=3)
    assert not watch.failed("refused") and not watch.failed("refused")
    watch.answered()  # the host answered in between: the count starts again
    assert not watch.failed("refused") and not watch.failed("refused") and watch.failed("refused")
    code, _ = download(capsys, server, manifest, tmp_path / "ok")
    assert code == 0


def test_progress_lines_when_stderr_is_not_a_terminal(served, tmp_path, monkeypatch, capsys):
    server, manifest, files = served
    monkeypatch.setattr("s3prl_stimulus.study.corpus.PROGRESS_EVERY_S", 0.0)
    code = cli.main(["download", "--to", str(tmp_path / "AudioWAV"), "--base-url", server.url, "--manifest",
                     str(manifest), "--workers", "1", "--retries", "0"])  # no --quiet; pytest's stderr is no terminal
    err = capsys.readouterr().err
    assert code == 0
    pattern = re.compile(r"^download: (\d+)/4 clips, ([\d.]+)/([\d.]+) MB, [\d.]+ MB/s, (ETA .+|done)$")
    lines = [pattern.match(line) for line in err.splitlines() if line.startswith("download:")]
    assert lines and all(lines), err
    total_mb = sum(len(b) for b in files.values()) / 1e6
    final = lines[-1]
    assert final.group(1) == "4" and final.group(4) == "done" and float(final.group(2)) == pytest.approx(total_mb, abs=0.06)
    assert float(final.group(3)) == pytest.approx(total_mb, abs=0.06)
    assert any(m.group(4).startswith("ETA") for m in lines[:-1])
