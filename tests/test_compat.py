"""The launcher and its shims: S3PRL 0.4.18 imports and runs on the current torch/torchaudio/huggingface_hub."""

import argparse
import importlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from s3prl_stimulus.integration import compat
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.launcher import packaged_config, resolve_arguments


def run_python(code: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


# ---------------------------------------------------------------- shims, in process


@pytest.fixture(scope="module")
def prepared():
    pytest.importorskip("s3prl")
    return compat.prepare_s3prl_stack()


def test_prepare_is_idempotent_and_s3prl_hub_imports(prepared):
    import torch.serialization

    with torch.serialization.safe_globals([argparse.Namespace]):
        pass  # on exit torch removes Namespace from the allow-list, whoever had added it
    assert compat.prepare_s3prl_stack() == prepared  # ... and a later call puts it back
    import torchaudio

    hub = importlib.import_module("s3prl.hub")
    assert callable(hub.fbank) and callable(hub.wavlm_local)
    torchaudio.set_audio_backend("sox_io")  # S3PRL's call: must not raise
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    # S3PRL's fbank upstream needs torchaudio.compliance.kaldi, pure Python even without the extension
    import torch

    frames = torchaudio.compliance.kaldi.fbank(torch.zeros(1, 16000), num_mel_bins=80)
    assert frames.shape == (98, 80)


def test_sox_effects_stand_in_fails_clearly(prepared):
    import torchaudio.sox_effects

    if "torchaudio.sox_effects" not in prepared:
        pytest.skip("this torchaudio still has sox_effects")
    with pytest.raises(RuntimeError, match="removed in torchaudio 2.9"):
        torchaudio.sox_effects.apply_effects_tensor(None, 16000, [])


def test_extension_failure_is_recognised_by_where_it_was_raised():
    def raise_from(filename):
        try:
            exec(compile("raise OSError('Could not load this library: _torchaudio.abi3.so')", filename, "exec"))
        except OSError as error:
            return error

    assert compat._raised_by_extension_loader(raise_from("/venv/site-packages/torchaudio/_extension/utils.py"))
    assert not compat._raised_by_extension_loader(raise_from("/venv/site-packages/torchaudio/_torchcodec.py"))
    assert not compat._raised_by_extension_loader(raise_from("/venv/site-packages/other/_extension/x.py"))


def test_extension_stub_reports_missing_alignment():
    stub = compat._extension_stub()
    assert stub._IS_TORCHAUDIO_EXT_AVAILABLE is False and stub._load_lib("libtorchaudio") is False

    @stub.fail_if_no_align
    def forced_align(x):
        return x

    with pytest.raises(RuntimeError, match="compiled extension"):
        forced_align(1)


def test_huggingface_hub_names_added_only_when_missing():
    old_hub = types.ModuleType("huggingface_hub")  # < 1.0: has both names
    old_hub.HfFolder, old_hub.Repository = object(), object()
    assert compat._add_huggingface_hub_names(old_hub) == []

    new_hub = types.ModuleType("huggingface_hub")  # >= 1.0: neither
    assert compat._add_huggingface_hub_names(new_hub) == ["huggingface_hub.HfFolder", "huggingface_hub.Repository"]
    assert callable(new_hub.HfFolder.get_token)
    with pytest.raises(RuntimeError, match="push_to_hf_hub"):
        new_hub.Repository(local_dir="x", clone_from="y")


def test_missing_s3prl_runtime_is_one_actionable_line(monkeypatch):
    monkeypatch.setattr(compat, "S3PRL_RUNTIME", ("s3prl", "no_such_module_for_s3prl"))
    with pytest.raises(StimulusError, match=r"needs no_such_module_for_s3prl, not installed .*pip install") as caught:
        compat._check_runtime_installed()
    assert "\n" not in str(caught.value)


def test_torch_load_accepts_s3prl_checkpoints_only_after_prepare(tmp_path):
    pytest.importorskip("s3prl")
    checkpoint = tmp_path / "states-1.ckpt"
    result = run_python(f"""
        import argparse, pickle, torch
        torch.save({{"Args": argparse.Namespace(seed=7, mode="train"), "Step": 1}}, {str(checkpoint)!r})
        try:
            torch.load({str(checkpoint)!r}, map_location="cpu")
            print("loaded-before")
        except pickle.UnpicklingError:
            print("refused-before")
        from s3prl_stimulus.integration.compat import prepare_s3prl_stack
        prepare_s3prl_stack()
        ckpt = torch.load({str(checkpoint)!r}, map_location="cpu")  # default weights_only, as S3PRL calls it
        print("after", ckpt["Args"].seed, ckpt["Step"])
        class Evil:
            pass
        torch.save({{"x": Evil()}}, {str(tmp_path / "other.ckpt")!r})
        try:
            torch.load({str(tmp_path / "other.ckpt")!r})
            print("evil-loaded")
        except pickle.UnpicklingError:
            print("evil-refused")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused-before", "after", "7", "1", "evil-refused"]


# ---------------------------------------------------------------- argument defaults (pure)


def test_config_defaults_to_packaged_only_for_new_emotion_stimulus_runs(tmp_path):
    argv, notes = resolve_arguments(["-m", "train", "-d", "emotion_stimulus", "-u", "fbank"], environ={}, cuda_available=True)
    assert argv[-2:] == ["-c", str(packaged_config())] and len(notes) == 1
    assert packaged_config().is_file()

    given = ["-m", "train", "-d", "emotion_stimulus", "-c", "mine.yaml"]
    assert resolve_arguments(given, environ={}, cuda_available=True)[0] == given
    other = ["-m", "train", "-d", "emotion", "-u", "fbank"]
    assert resolve_arguments(other, environ={}, cuda_available=True)[0] == other
    resume = ["-m", "evaluate", "-e", "x/dev-best.ckpt"]
    assert resolve_arguments(resume, environ={}, cuda_available=True)[0] == resume

    # -a: S3PRL resumes (config from the checkpoint) only when the expdir holds states-*.ckpt
    expdir = tmp_path / "exp"
    auto = ["-m", "train", "-a", "-d", "emotion_stimulus", "-p", str(expdir)]
    assert "-c" in resolve_arguments(auto, environ={}, cuda_available=True)[0]
    expdir.mkdir()
    (expdir / "states-20.ckpt").write_bytes(b"")
    assert resolve_arguments(auto, environ={}, cuda_available=True)[0] == auto


def test_device_defaults_to_cpu_without_cuda():
    argv, notes = resolve_arguments(["-m", "train", "-d", "emotion", "-u", "fbank"], environ={}, cuda_available=False)
    assert argv[-2:] == ["--device", "cpu"] and "CUDA is not available" in notes[0]
    assert "--device" not in resolve_arguments(["-m", "train", "-d", "emotion"], environ={}, cuda_available=True)[0]
    kept = ["-m", "train", "--device", "cpu"]
    assert resolve_arguments(kept, environ={}, cuda_available=False)[0] == kept
    with pytest.raises(StimulusError, match="pass --device cpu"):
        resolve_arguments(["-m", "train", "--device", "cuda:1"], environ={}, cuda_available=False)


def test_torchrun_rank_is_passed_to_s3prl():
    torchrun = {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}
    argv, _ = resolve_arguments(["-m", "train", "-d", "emotion"], environ=torchrun, cuda_available=True)
    assert argv[-2:] == ["--local_rank", "1"]
    explicit = ["-m", "train", "--local_rank", "0"]
    assert resolve_arguments(explicit, environ=torchrun, cuda_available=True)[0] == explicit
    # torch.distributed.launch's dash spelling, which S3PRL's parser rejects, is translated
    assert resolve_arguments(["-m", "train", "--local-rank=3"], environ={}, cuda_available=True)[0] == ["-m", "train", "--local_rank=3"]
    with pytest.raises(StimulusError, match="GPUs only"):
        resolve_arguments(["-m", "train"], environ=torchrun, cuda_available=False)
    single = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    argv, notes = resolve_arguments(["-m", "train"], environ=single, cuda_available=False)
    assert "--local_rank" not in argv and "without DDP" in notes[-1]


def test_launcher_warns_when_k_goes_to_an_entry_that_drops_it():
    def warnings(*argv):
        given = ["-m", "train", "-d", "emotion_stimulus", *argv]
        resolved, notes = resolve_arguments(given, environ={}, cuda_available=True)
        assert resolved[:len(given)] == given  # a warning, never a rewrite: S3PRL gets the user's command
        return [n for n in notes if n.startswith("WARNING")]

    [large] = warnings("-u", "wavlm_large", "-k", "/models/wavlm.pt")
    assert large == ("WARNING: -k /models/wavlm.pt is ignored: S3PRL's wavlm_large always loads its own download "
                     "(wavlm_large replaces -k with its URL); to use the file, run -u wavlm_local -k /models/wavlm.pt")
    [cpc] = warnings("--upstream", "modified_cpc", "--upstream_ckpt", "/m/cpc.pt")
    assert cpc.endswith("run -u cpc_local -k /m/cpc.pt")
    [fbank] = warnings("-u", "fbank", "-k", "/m/x.pt")
    assert "fbank is computed from the waveform and has no weights; drop -k" in fbank
    assert warnings("-u", "wavlm_local", "-k", "/m/x.pt") == warnings("-u", "wavlm_large") == []


def test_each_paper_upstream_drops_k_and_its_local_entry_loads_the_same_model(prepared, monkeypatch, tmp_path):
    """Against the installed S3PRL: with -k given, each entry still fetches its own URL; the file that fetch
    yields is loaded by the same upstream expert as the table's local entry loads -k with. Nothing is downloaded:
    the fetch writes an empty file into a temporary S3PRL cache, so both loaders fail on it where they read it."""
    import traceback

    import s3prl.util.download as download

    from s3prl_stimulus.integration.hub_entries import LOCAL_ENTRY, WAVEFORM_FEATURES

    hub = importlib.import_module("s3prl.hub")
    fetched = []

    def fake_download(filepath, url, *args, **kwargs):
        fetched.append(url)
        Path(filepath).write_bytes(b"")

    monkeypatch.setattr(download, "_download_dir", tmp_path / "s3prl-cache")
    monkeypatch.setattr(download, "_download", fake_download)
    given = tmp_path / "given.pt"
    given.write_bytes(b"")

    def loader(entry: str) -> str:
        """The upstream expert whose __init__ read (and failed on) the empty checkpoint."""
        with pytest.raises(Exception) as error:
            getattr(hub, entry)(ckpt=str(given))
        frames = [f for f in traceback.extract_tb(error.value.__traceback__)
                  if "/s3prl/upstream/" in f.filename and f.filename.endswith("expert.py") and f.name == "__init__"]
        return Path(frames[0].filename).parent.name

    for name, local in LOCAL_ENTRY.items():
        fetched.clear()
        named = loader(name)
        assert len(fetched) == 1 and fetched[0].startswith("https://"), name  # -k dropped: its own URL instead
        assert loader(local) == named and len(fetched) == 1, name  # the local entry reads -k, fetches nothing
    for name in WAVEFORM_FEATURES:
        assert getattr(hub, name)(ckpt=str(tmp_path / "absent.pt")) is not None  # builds: -k unused


def test_help_is_passed_through_untouched():
    assert resolve_arguments(["-h", "-d", "emotion_stimulus"], environ={"LOCAL_RANK": "0"}, cuda_available=False) == (
        ["-h", "-d", "emotion_stimulus"], [])


# ---------------------------------------------------------------- the launcher, end to end


def test_launcher_help_runs_s3prl_run_downstream():
    pytest.importorskip("s3prl")
    result = subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", "-h"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: run_downstream.py" in result.stdout
    assert "--local_rank LOCAL_RANK" in result.stdout and "wavlm_local" in result.stdout


def test_launcher_hands_s3prl_the_completed_argv_and_reports_bad_input_in_one_line(prepared, monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("s3prl.run_downstream")
    fake.__file__ = "/s3prl/run_downstream.py"

    def fake_main():
        seen["argv"] = list(sys.argv)
        raise StimulusError("3 of 30 clips are bad: fix them")

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "s3prl.run_downstream", fake)
    monkeypatch.setattr(sys, "argv", ["launcher"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from s3prl_stimulus.integration import launcher as run_downstream

    assert run_downstream.main(["-m", "train", "-d", "emotion_stimulus", "-u", "fbank"]) == 2
    argv = seen["argv"]
    assert argv[:6] == ["/s3prl/run_downstream.py", "-m", "train", "-d", "emotion_stimulus", "-u"]
    assert argv[argv.index("-c") + 1] == str(packaged_config())
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: 3 of 30 clips are bad: fix them"
    assert "Traceback" not in err


def test_alias_resolves_to_the_package_modules(prepared):
    from s3prl_stimulus.integration.registration import ALIAS, TARGET, install_alias

    install_alias()
    alias = importlib.import_module(ALIAS)
    real = importlib.import_module(TARGET)
    assert alias is real and real.__spec__.name == TARGET
    expert = importlib.import_module(f"{ALIAS}.expert")
    assert expert is importlib.import_module(f"{TARGET}.expert")
    assert expert.DownstreamExpert.__module__ == f"{TARGET}.expert"  # picklable by its real name


TOY_EXPERT = '''
import glob, os
import numpy as np, soundfile as sf, torch
from torch.utils.data import DataLoader


class DownstreamExpert(torch.nn.Module):
    """Two-class toy: just enough of S3PRL's downstream contract to drive the runner."""

    def __init__(self, upstream_dim, downstream_expert, expdir, **kwargs):
        super().__init__()
        self.files = sorted(glob.glob(os.path.join(downstream_expert["datarc"]["root"], "*.wav")))
        self.linear = torch.nn.Linear(upstream_dim, 2)
        self.expdir = expdir

    def get_dataloader(self, split, epoch=0):
        items = [(sf.read(f, dtype="float32")[0], i % 2) for i, f in enumerate(self.files)]
        return DataLoader(items, batch_size=2, collate_fn=lambda b: ([w for w, _ in b], torch.tensor([y for _, y in b])))

    def forward(self, split, features, labels, records, **kwargs):
        logits = self.linear(torch.stack([f.mean(0) for f in features]))
        loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device))
        records["loss"].append(loss.item())
        return loss

    def log_records(self, split, records, logger, global_step, **kwargs):
        with open(os.path.join(self.expdir, f"{split}-{global_step}.loss"), "w") as f:
            f.write(str(float(np.mean(records["loss"]))))
        return ["dev-best.ckpt"] if split == "dev" else []
'''

TOY_CONFIG = '''
runner: {total_steps: 4, gradient_clipping: 1, gradient_accumulate_steps: 1, log_step: 2, eval_step: 2,
         save_step: 2, max_keep: 2, eval_dataloaders: [dev]}
optimizer: {name: AdamW, lr: 1.0e-3}
downstream_expert: {datarc: {root: AUDIO}}
'''


@pytest.mark.slow
def test_launcher_trains_and_evaluates_a_downstream_through_unmodified_s3prl(tmp_path):
    """S3PRL's runner: train (eval on dev, dev-best.ckpt), then -m evaluate -e (torch.load of Args)."""
    pytest.importorskip("s3prl")
    from s3prl_stimulus.testing import make_corpus, tiny_clip_subset

    make_corpus(tmp_path / "audio", tiny_clip_subset(2, fold=1)[:4], max_seconds=1.5)
    package = tmp_path / "pkgs" / "toy_stimulus_downstream"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "expert.py").write_text(TOY_EXPERT)
    (tmp_path / "config.yaml").write_text(TOY_CONFIG.replace("AUDIO", str(tmp_path / "audio")))
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "pkgs")!r})
        from s3prl_stimulus.integration.registration import install_alias
        install_alias("s3prl.downstream.toy_stimulus_downstream", "toy_stimulus_downstream")
        from s3prl_stimulus.integration.launcher import main
        sys.exit(main())
    """))
    expdir = tmp_path / "exp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    train = subprocess.run(
        [sys.executable, str(launcher), "-m", "train", "-d", "toy_stimulus_downstream", "-c", str(tmp_path / "config.yaml"),
         "-u", "fbank", "-p", str(expdir)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert {"dev-best.ckpt", "states-4.ckpt", "dev-2.loss", "dev-4.loss", "train-4.loss"} <= {p.name for p in expdir.iterdir()}

    evaluate = subprocess.run(
        [sys.executable, str(launcher), "-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "dev"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    # -m evaluate logs at global_step 0; dev-best.ckpt is the step-4 model, so it scores what step 4 scored
    assert float((expdir / "dev-0.loss").read_text()) == pytest.approx(float((expdir / "dev-4.loss").read_text()), rel=1e-5)


def test_launcher_refuses_checkpoints_of_another_task(tmp_path):
    import argparse

    import torch

    from s3prl_stimulus.integration.compat import prepare_s3prl_stack
    from s3prl_stimulus.errors import StimulusError
    from s3prl_stimulus.integration.launcher import check_past_checkpoint

    prepare_s3prl_stack()
    ckpt = tmp_path / "dev-best.ckpt"
    torch.save({"Args": argparse.Namespace(downstream="asr"), "Step": 3}, ckpt)
    with pytest.raises(StimulusError, match="trained for downstream 'asr', not 'emotion_stimulus'"):
        check_past_checkpoint(["-m", "evaluate", "-d", "emotion_stimulus", "-e", str(ckpt)])
    check_past_checkpoint(["-m", "evaluate", "-e", str(ckpt)])  # no -d: S3PRL runs the checkpoint's own task
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(StimulusError, match="not an S3PRL downstream checkpoint"):
        check_past_checkpoint(["-m", "evaluate", "-e", str(tmp_path / "junk.ckpt")])
    with pytest.raises(StimulusError, match="does not exist"):
        check_past_checkpoint(["-m", "evaluate", "-e", str(tmp_path / "missing.ckpt")])


def _prepare_in_fresh_interpreter(extra_env: dict) -> subprocess.CompletedProcess:
    code = "from s3prl_stimulus.integration.compat import prepare_s3prl_stack; print(prepare_s3prl_stack())"
    env = {k: v for k, v in os.environ.items() if k != "S3PRL_STIMULUS_VERBOSE"} | extra_env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_a_mismatched_torchaudio_is_mentioned_only_at_the_verbose_level():
    pytest.importorskip("s3prl")
    quiet = _prepare_in_fresh_interpreter({})
    assert quiet.returncode == 0, quiet.stderr
    if "torchaudio-without-extension" not in quiet.stdout:
        pytest.skip("this stack's torchaudio matches its torch: no fallback, no notice")
    assert "torchaudio" not in quiet.stderr  # a supported set-up is not reported on every command
    verbose = _prepare_in_fresh_interpreter({"S3PRL_STIMULUS_VERBOSE": "1"})
    notice = [line for line in verbose.stderr.splitlines() if line.startswith("[s3prl-stimulus] torchaudio")]
    assert len(notice) == 1 and "was built for another torch" in notice[0] and "fbank and MFCC features work" in notice[0]
