"""``s3prl-stimulus doctor``: whether this machine runs the study, one line per check, before any download.

In order, each line ``✓ what`` or ``✗ what — fix: how``:

1. the stack: Python, torch, torchaudio, S3PRL (0.4.18) and the libraries it imports, CUDA, bf16;
2. the compatibility shims the launcher applies here, and why;
3. whether S3PRL's plain ``run_downstream`` finds ``-d emotion_stimulus``;
4. the paper's 15 upstreams: local entry, hidden states x width at frames per second, parameters, and whether the
   weights are in S3PRL's download cache (else how much a download costs); with ``-u NAME``, that upstream built
   and measured;
5. a smoke run (about 30 s on a CPU with fbank) on generated audio: a few training steps through S3PRL's runner
   (the launcher, in this process), ``-m evaluate`` of dev-best, and the cache path (extract, then score dev-best)
   on the same clips, with the two paths' probabilities compared.

The exit status is 0 only when every line is ✓. Nothing is downloaded unless ``--download`` is given.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS, PaperUpstream, cached_weights_path

S3PRL_VERSION = "0.4.18"
INSTALL = ("pip install 's3prl-stimulus[s3prl]' && pip install --no-deps s3prl==0.4.18 torchaudio==<your torch's "
           "release, or 2.11.0> (README, Set-up)")
RUNTIME_DISTRIBUTIONS = {"yaml": "PyYAML", "tensorboardX": "tensorboardX", "huggingface_hub": "huggingface_hub",
                         "omegaconf": "omegaconf", "transformers": "transformers", "numpy": "numpy"}
SMOKE_CLIPS_PER_SPLIT = 6
SMOKE_STEPS = 4
AGREEMENT = 1e-4
"""Largest difference in any probability between the two paths on the same clips (measured: ~1e-8 on a CPU)."""


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"✓ {self.what}" if self.ok else f"✗ {self.what}" + (f" — fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Request:
    """What to check: the smoke run's upstream (``-u``/``-k``), the device, whether downloads are allowed."""

    upstream: str = "fbank"
    ckpt: Optional[str] = None
    device: Optional[str] = None
    download: bool = False
    smoke: bool = True


def run(request: Request, report: Callable[[str], None] = print) -> int:
    """Print every check's line as it is made; 0 when all passed, else 1. Logs of S3PRL's output go to a
    temporary folder, named in the fix of a failed line and removed when everything passed."""
    workdir = Path(tempfile.mkdtemp(prefix="s3prl-stimulus-doctor-"))
    failed = False
    for check in checks(request, workdir):
        report(check.line())
        failed |= not check.ok
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def checks(request: Request, workdir: Path) -> Iterator[Check]:
    stack = list(_guarded("the stack", lambda: stack_checks(request.device), workdir))
    yield from stack
    if not _passed(stack, "torch"):
        return  # everything below needs torch
    shims = list(_guarded("the shims", shim_checks, workdir))
    yield from shims
    yield from _guarded("the downstream", lambda: [downstream_check()], workdir)
    yield from _guarded("the upstreams", lambda: [upstream_check(u) for u in PAPER_UPSTREAMS], workdir)
    s3prl_runs = _passed(stack, "S3PRL") and _passed(stack, "S3PRL's runtime:") and all(c.ok for c in shims)
    if not s3prl_runs:
        yield Check(False, f"upstream build and smoke run: not run without a working S3PRL {S3PRL_VERSION} (see above)",
                    INSTALL)
        return
    device = request.device or _default_device()
    if request.upstream != "fbank" or request.ckpt:
        yield from _guarded(f"building {request.upstream}", lambda: [built_check(request, device, workdir)], workdir)
    if request.smoke:
        yield from _guarded("the smoke run", lambda: smoke_checks(request, device, workdir), workdir)


def _guarded(what: str, produce: Callable[[], Iterable[Check]], workdir: Path) -> Iterator[Check]:
    """The checks ``produce`` makes; an unexpected failure becomes one ✗ line (traceback in the workdir)."""
    from s3prl_stimulus.errors import StimulusError

    try:
        yield from produce()
    except StimulusError as error:  # already says what to do
        yield Check(False, f"{what}: {error}")
    except Exception as error:  # a doctor reports what broke, whatever it is
        log = workdir / "errors.log"
        with open(log, "a") as out:
            traceback.print_exc(file=out)
        yield Check(False, f"{what}: {type(error).__name__}: {_one_line(error)}", f"the traceback is in {log}")


def _passed(checks_made: list[Check], subject: str) -> bool:
    """Whether the check about ``subject`` (the first word(s) of its line) was made and passed."""
    return any(c.ok and c.what.startswith(subject if subject.endswith(":") else subject + " ") for c in checks_made)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# ---------------------------------------------------------------- 1. the stack


def stack_checks(device: Optional[str]) -> list[Check]:
    made = [python_check(), torch_check()]
    if not made[-1].ok:
        return made
    made += [s3prl_check(), runtime_check(), cuda_check(device), bf16_check(device or _default_device())]
    return made


def python_check() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 9)
    return Check(ok, f"Python {version} ({sys.executable})", "use Python 3.9 or newer (tested: 3.11)")


def torch_check() -> Check:
    try:
        import torch
    except Exception as error:  # ImportError, or OSError from a broken CUDA build
        return Check(False, f"torch: does not import ({type(error).__name__}: {_one_line(error)})",
                     'pip install "torch==2.13.0" (or your CUDA build), then the rest of README, Set-up')
    return Check(True, f"torch {torch.__version__}")


def s3prl_check() -> Check:
    try:
        import s3prl  # noqa: F401  (importing it is the check)
        version = importlib.metadata.version("s3prl")
    except Exception as error:
        return Check(False, f"S3PRL: does not import ({type(error).__name__}: {_one_line(error)})", INSTALL)
    if version != S3PRL_VERSION:
        return Check(False, f"S3PRL {version}: s3prl-stimulus runs S3PRL {S3PRL_VERSION}",
                     f"pip install --no-deps s3prl=={S3PRL_VERSION}")
    return Check(True, f"S3PRL {version} ({Path(s3prl.__file__).parent})")


def runtime_check() -> Check:
    found, missing = [], []
    for module, distribution in RUNTIME_DISTRIBUTIONS.items():
        if importlib.util.find_spec(module) is None:
            missing.append(module)
        else:
            found.append(f"{distribution} {importlib.metadata.version(distribution)}")
    if missing:
        return Check(False, f"S3PRL's runtime: {', '.join(missing)} not installed", INSTALL)
    return Check(True, f"S3PRL's runtime: {', '.join(found)}")


def cuda_check(device: Optional[str]) -> Check:
    import torch

    wants_cuda = (device or "").startswith("cuda")
    if not torch.cuda.is_available():
        what = f"CUDA: not available to torch {torch.__version__}" + ("" if wants_cuda else "; runs use the CPU")
        return Check(not wants_cuda, what, "install a CUDA build of torch (and a matching torchaudio), or use --device cpu")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check(True, f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} device(s), {', '.join(names)}")


def bf16_check(device: str) -> Check:
    """Whether a bfloat16 matmul runs on ``device`` (``extract --dtype bf16``)."""
    import torch

    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            product = torch.ones(4, 4, device=device) @ torch.ones(4, 4, device=device)
        ok = product.dtype == torch.bfloat16 and float(product[0, 0]) == 4.0
    except Exception:  # a device or build without bf16 kernels
        ok = False
    return Check(ok, f"bf16 on {device}: {'works' if ok else 'not supported'} (extract --dtype bf16)",
                 "extract with --dtype fp32 (the default)")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- 2. shims, 3. downstream


def shim_checks() -> list[Check]:
    from s3prl_stimulus.errors import StimulusError
    from s3prl_stimulus.integration.compat import SHIMS, prepare_s3prl_stack

    try:
        applied = prepare_s3prl_stack()
    except (StimulusError, ImportError, OSError) as error:
        return [Check(False, f"shims: the stack cannot be prepared for S3PRL ({_one_line(error)})", INSTALL)]
    import torchaudio

    made = [Check(True, f"torchaudio {torchaudio.__version__}")]
    made += [Check(True, f"shim {name}: {SHIMS.get(name, 'see docs/s3prl_stack.md')}") for name in applied]
    return made if applied else made + [Check(True, "shims: none needed on this stack")]


def downstream_check() -> Check:
    from s3prl_stimulus.integration.registration import ALIAS

    try:
        spec = importlib.util.find_spec(ALIAS + ".expert")
    except Exception as error:  # importing s3prl.downstream itself failed
        spec, reason = None, f" ({type(error).__name__}: {_one_line(error)})"
    else:
        reason = ""
    if spec is None or not spec.origin:
        return Check(False, f"S3PRL's run_downstream cannot find -d emotion_stimulus{reason}",
                     "reinstall s3prl-stimulus (pip install -e .) for its .pth alias, or run s3prl-stimulus register "
                     "(the launcher finds it either way)")
    return Check(True, f"S3PRL finds -d emotion_stimulus through {_how_found()}: {ALIAS} -> {spec.origin}")


def _how_found() -> str:
    from s3prl_stimulus.integration.registration import ALIAS, DOWNSTREAM_NAME, is_our_link, s3prl_downstream_dir

    if any(getattr(finder, "s3prl_stimulus_alias", None) == ALIAS for finder in sys.meta_path):
        return "the .pth alias"
    if is_our_link(s3prl_downstream_dir() / DOWNSTREAM_NAME):
        return "s3prl-stimulus register's link"
    return "a folder in S3PRL's tree (a copy: it does not follow updates of s3prl-stimulus)"


# ---------------------------------------------------------------- 4. upstreams


def upstream_check(upstream: PaperUpstream) -> Check:
    shape = (f"{upstream.hidden_states} hidden state{'s' if upstream.hidden_states > 1 else ''} × {upstream.dim} "
             f"at {upstream.frames_per_second:g} frames/s")
    head = f"{upstream.name} ({upstream.title}): {shape}"
    if upstream.url is None:
        return Check(True, f"{head}; computed from the waveform, nothing to download")
    head += f", {upstream.parameters_m:g} M parameters; local entry {upstream.local} -k FILE"
    if upstream.name in ("tera", "mockingjay") and importlib.util.find_spec("distutils") is None:
        return Check(False, f"{head}; S3PRL's TERA/Mockingjay code imports distutils, gone from this Python",
                     "pip install setuptools (it provides distutils)")
    return Check(True, f"{head}; {_weights_status(upstream)}")


def _weights_status(upstream: PaperUpstream) -> str:
    cached = cached_weights_path(upstream.url)
    if cached.is_file():
        return f"weights cached: {cached} ({cached.stat().st_size / 1e6:.0f} MB)"
    host = urllib.parse.urlsplit(upstream.url).hostname
    return f"not cached: about {upstream.weights_mb} MB from {host} at first use"


def built_check(request: Request, device: str, workdir: Path) -> Check:
    """Build the requested upstream as the runner does and measure what the featurizer sees."""
    from s3prl_stimulus.cache.upstream import UpstreamSpec, build_upstream

    facts = _facts_of(request.upstream)
    missing = _missing_weights(request, facts)
    if missing:
        return missing
    started = time.perf_counter()
    if facts is not None and facts.url is not None and request.download and not request.ckpt:
        _download(facts.url)  # before S3PRL's output is silenced: its progress bar shows
    with _quiet(workdir / "build.log"):
        upstream, featurizer = build_upstream(UpstreamSpec(request.upstream, request.ckpt), device)
        n_hidden, dim, rate = _measure(upstream, featurizer, device)
    parameters = sum(p.numel() for p in upstream.parameters()) / 1e6
    seen = f"{n_hidden} hidden states × {dim} at {16000 / rate:g} frames/s, {parameters:.1f} M parameters"
    what = f"{request.upstream} built on {device} in {time.perf_counter() - started:.1f} s: {seen}"
    if facts is None:
        return Check(True, what)
    if (n_hidden, rate) != (facts.hidden_states, facts.rate):
        return Check(False, f"{what}; the released {facts.title} has {facts.hidden_states} at "
                            f"{facts.frames_per_second:g} frames/s",
                     f"the weights are not the released ones: delete {cached_weights_path(facts.url)} to download "
                     "them again, or pass the file you mean with its local entry and -k")
    released = "as released" if dim == facts.dim else f"released: × {facts.dim}"
    return Check(True, f"{what} ({released})")


def _facts_of(name: str) -> Optional[PaperUpstream]:
    return next((u for u in PAPER_UPSTREAMS if u.name == name), None)


def _missing_weights(request: Request, facts: Optional[PaperUpstream]) -> Optional[Check]:
    if facts is None or facts.url is None or request.download or request.ckpt:
        return None
    if cached_weights_path(facts.url).is_file():
        return None
    return Check(False, f"{request.upstream}: weights not in S3PRL's download cache, nothing downloaded",
                 f"add --download (about {facts.weights_mb} MB), or pass -u {facts.local} -k FILE")


def _download(url: str) -> None:
    """S3PRL's own downloader: the file lands where its hub looks for it (``cached_weights_path``)."""
    from s3prl.util.download import _urls_to_filepaths

    _urls_to_filepaths(url)


def _measure(upstream, featurizer, device: str) -> tuple[int, int, int]:
    import torch

    from s3prl_stimulus.cache.upstream import hidden_states

    with torch.no_grad():
        states = hidden_states(upstream, featurizer, [torch.randn(16000, device=device) * 0.1])
    return len(states), int(states[0].shape[-1]), int(featurizer.downsample_rate)


# ---------------------------------------------------------------- 5. smoke run


def smoke_checks(request: Request, device: str, workdir: Path) -> Iterator[Check]:
    """Train and evaluate on generated clips through S3PRL's runner, then score the same checkpoint from the cache."""
    missing = _missing_weights(request, _facts_of(request.upstream))
    if missing:
        yield Check(False, f"smoke run with {request.upstream}: not run, its weights are not cached", missing.fix)
        return
    yield from _smoke_steps(request, device, workdir, workdir / "smoke.log")


def _smoke_steps(request: Request, device: str, workdir: Path, log: Path) -> Iterator[Check]:
    from s3prl_stimulus.testing import make_corpus, tiny_clip_subset

    audio = workdir / "AudioWAV"
    make_corpus(audio, tiny_clip_subset(SMOKE_CLIPS_PER_SPLIT, fold=1), max_seconds=1.0)
    expdir = workdir / "s3prl"
    upstream = ["-u", request.upstream] + (["-k", request.ckpt] if request.ckpt else [])
    fix = f"read {log}"
    trained = _launch(log, ["-m", "train", "-d", "emotion_stimulus", *upstream, "-p", str(expdir), "--device", device,
                            "-o", _smoke_overrides(audio)])
    dev_best = expdir / "dev-best.ckpt"
    yield Check(trained.ok and dev_best.is_file(),
                f"S3PRL path: {SMOKE_STEPS} training steps of {request.upstream} on {device} through S3PRL's runner "
                f"({trained.seconds:.1f} s){trained.error}", fix)
    if not dev_best.is_file():
        return
    evaluated = _launch(log, ["-m", "evaluate", "-e", str(dev_best), "--device", device])
    predictions = expdir / "predictions-test-dev-best.csv"
    yield Check(evaluated.ok and predictions.is_file(),
                f"S3PRL path: -m evaluate dev-best.ckpt on the test clips ({evaluated.seconds:.1f} s){evaluated.error}",
                fix)
    if predictions.is_file():
        yield from _cache_path_checks(request, device, workdir, log, dev_best, predictions)


def _smoke_overrides(audio: Path) -> str:
    """A tiny run; evaluation one clip at a time, as the cache encodes clips, so both paths see the same features."""
    datarc = "config.downstream_expert.datarc"
    options = {f"{datarc}.audio_dir": repr(str(audio)), f"{datarc}.clips": "'present'", f"{datarc}.num_workers": 0,
               f"{datarc}.train_batch_size": SMOKE_CLIPS_PER_SPLIT, f"{datarc}.eval_batch_size": 1,
               "config.runner.total_steps": SMOKE_STEPS, "config.runner.log_step": SMOKE_STEPS,
               "config.runner.eval_step": SMOKE_STEPS, "config.runner.save_step": SMOKE_STEPS,
               "config.downstream_expert.evalrc.bootstrap_samples": 20}
    return ",,".join(f"{key}={value}" for key, value in options.items())


def _cache_path_checks(request, device, workdir, log, dev_best, predictions) -> Iterator[Check]:
    import numpy as np
    import pandas as pd

    from s3prl_stimulus import CLASSES
    from s3prl_stimulus.cache.extraction import extract
    from s3prl_stimulus.cache.sweeping import evaluate_checkpoint
    from s3prl_stimulus.cache.upstream import UpstreamSpec

    started = time.perf_counter()
    with _quiet(log):
        extract(workdir / "AudioWAV", workdir / "cache", UpstreamSpec(request.upstream, request.ckpt), folds=[1],
                clips="present", device=device, progress=False)
        frame, _ = evaluate_checkpoint([workdir / "cache"], dev_best, device=device, out=workdir / "scored")
    yield Check(True, f"cache path: extracted the clips and scored dev-best.ckpt ({time.perf_counter() - started:.1f} s)")
    reference = pd.read_csv(predictions)
    same_clips = list(frame["clip"]) == list(reference["clip"])
    difference = float(np.abs(frame[list(CLASSES)].to_numpy() - reference[list(CLASSES)].to_numpy()).max()) \
        if same_clips else float("inf")
    yield Check(same_clips and difference <= AGREEMENT,
                f"the two paths agree on the {len(reference)} test clips: largest probability difference "
                f"{difference:.1e} (allowed {AGREEMENT:.0e})",
                f"the S3PRL path and the cache path disagree on this stack: report it with {workdir}")


@dataclass(frozen=True)
class _Launched:
    ok: bool
    seconds: float
    error: str


def _launch(log: Path, argv: list[str]) -> _Launched:
    """The launcher's ``main`` in this process, its output appended to ``log``."""
    from s3prl_stimulus.integration.launcher import main

    started = time.perf_counter()
    saved_argv, saved_isinstance = list(sys.argv), builtins.isinstance
    try:
        with _quiet(log):
            status = main(argv)
    except (Exception, SystemExit) as error:  # S3PRL failed inside (argparse exits): one line, the log kept
        status, reason = 1, f": {type(error).__name__}: {_one_line(error)}"
    else:
        reason = "" if status == 0 else f": {_last_error(log)}"
    finally:
        sys.argv = saved_argv
        builtins.isinstance = saved_isinstance  # S3PRL replaces it process-wide (hack_isinstance)
    return _Launched(status == 0, time.perf_counter() - started, reason)


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else f"exit status non-zero, see {log}"


@contextlib.contextmanager
def _quiet(log: Path):
    """Send everything written to stdout and stderr (Python and C level, tqdm included) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as sink, contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
