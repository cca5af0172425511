"""Run S3PRL's own, unmodified ``run_downstream`` on today's stacks.

``python -m s3prl_stimulus.run_downstream <run_downstream arguments>`` (or the console script
``s3prl-stimulus-run-downstream``) takes exactly S3PRL's arguments. Before handing over it

1. patches the interpreter (:func:`s3prl_stimulus.integration.compat.prepare_s3prl_stack`): torchaudio without a
   matching compiled extension, the removed ``torchaudio.set_audio_backend``/``sox_effects`` and
   huggingface_hub names, ``argparse.Namespace`` allow-listed for ``torch.load``;
2. makes ``s3prl.downstream.emotion_stimulus`` resolve to this package's downstream (alias finder);
3. fills in what S3PRL would otherwise get wrong (:func:`resolve_arguments`): ``-c`` for
   ``-d emotion_stimulus`` (S3PRL looks for ``./downstream/<name>/config.yaml`` under the current
   directory), ``--device cpu`` without CUDA (S3PRL defaults to ``cuda``), and ``--local_rank`` under
   torchrun (which passes the rank only in ``LOCAL_RANK``; without the flag S3PRL trains one
   independent copy per process);
4. warns when ``-k`` goes to a hub entry that drops it (:mod:`s3prl_stimulus.integration.hub_entries`):
   ``-u wavlm_large -k FILE`` would download instead of reading FILE;
5. makes a kill harmless (:mod:`s3prl_stimulus.integration.interruptions`): checkpoints are written
   atomically, and a training run first deletes the temporary files a killed write left in its expdir.

Then it calls ``s3prl.run_downstream.main()``, which reads ``sys.argv`` as when S3PRL is run directly.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import zipfile
from pathlib import Path

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.hub_entries import fetch_failure, ignored_ckpt
from s3prl_stimulus.integration.interruptions import atomic_checkpoint_saves, clear_interrupted_writes
from s3prl_stimulus.integration.registration import DOWNSTREAM_NAME, downstream_folder
from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.seeds import check_seed

NOTE = "[s3prl-stimulus]"


def packaged_config() -> Path:
    """The downstream's packaged ``config.yaml`` (the paper's setup)."""
    return downstream_folder() / "config.yaml"


def _known_arguments() -> argparse.ArgumentParser:
    # The few S3PRL options the launcher reads, spelled as S3PRL spells them. Exact spellings only
    # (allow_abbrev=False): everything else, abbreviations included, goes to S3PRL untouched.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-m", "--mode")
    parser.add_argument("-d", "--downstream")
    parser.add_argument("-c", "--config")
    parser.add_argument("-e", "--past_exp")
    parser.add_argument("-a", "--auto_resume", action="store_true")
    parser.add_argument("-n", "--expname")
    parser.add_argument("-p", "--expdir")
    parser.add_argument("--device")
    parser.add_argument("--local_rank")
    parser.add_argument("--seed")
    parser.add_argument("-o", "--override")
    parser.add_argument("-u", "--upstream")
    parser.add_argument("-k", "--upstream_ckpt")
    return parser


def resolve_arguments(argv: list[str], environ=None, cuda_available: bool | None = None) -> tuple[list[str], list[str]]:
    """S3PRL's command line with the launcher's defaults filled in, and one note per default used.

    Pure apart from reading the file system for ``-a`` (whether ``expdir`` holds ``states-*.ckpt``)
    and the packaged config; ``environ``/``cuda_available`` default to the process's.
    """
    environ = os.environ if environ is None else environ
    argv = [_dash_local_rank(token) for token in argv]
    known, _ = _known_arguments().parse_known_args(argv)
    if known.help:
        return argv, []
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    notes = []
    argv, notes = _default_config(argv, known, notes)
    argv, notes = _default_device(argv, known, cuda_available, notes)
    argv, notes = _torchrun_rank(argv, known, environ, cuda_available, notes)
    ignored = ignored_ckpt(known.upstream, known.upstream_ckpt)
    return argv, notes + ([f"WARNING: {ignored}"] if ignored else [])


def _dash_local_rank(token: str) -> str:
    # `python -m torch.distributed.launch` now passes --local-rank=N, which S3PRL's parser rejects.
    if token == "--local-rank" or token.startswith("--local-rank="):
        return "--local_rank" + token[len("--local-rank"):]
    return token


def _default_config(argv, known, notes):
    if known.downstream != DOWNSTREAM_NAME or known.config is not None or _resumes(known):
        return argv, notes  # S3PRL reads the config from the checkpoint, or the user chose one
    config = packaged_config()
    if not config.is_file():
        raise StimulusError(f"packaged config {config} is missing: reinstall s3prl-stimulus, or pass -c CONFIG.yaml")
    return argv + ["-c", str(config)], notes + [f"-c defaults to the packaged {config}"]


def _resumes(known) -> bool:
    """Whether S3PRL will take args and config from a checkpoint (mirrors run_downstream's logic)."""
    if known.past_exp:
        return True
    if known.auto_resume:
        expdir = known.expdir or f"result/downstream/{known.expname}"
        return os.path.isdir(expdir) and bool(glob.glob(os.path.join(glob.escape(expdir), "states-*.ckpt")))
    return False


def _default_device(argv, known, cuda_available, notes):
    if known.device is None:
        if cuda_available:
            return argv, notes
        return argv + ["--device", "cpu"], notes + ["CUDA is not available: --device cpu (S3PRL's default is cuda)"]
    if known.device.startswith("cuda") and not cuda_available:
        raise StimulusError(f"--device {known.device} but CUDA is not available to torch {_torch_version()}: pass --device cpu")
    return argv, notes


def _torchrun_rank(argv, known, environ, cuda_available, notes):
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is None or known.local_rank is not None:
        return argv, notes
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if not cuda_available:
        if world_size > 1:
            raise StimulusError(
                f"torchrun started {world_size} processes but CUDA is not available: S3PRL's DDP runs on GPUs only "
                "(it calls torch.cuda.set_device); run one process without torchrun on CPU"
            )
        return argv, notes + ["torchrun with one CPU process: running without DDP"]
    return argv + ["--local_rank", local_rank], notes + [f"torchrun: --local_rank {local_rank} (DDP over {world_size} processes)"]


def check_past_checkpoint(argv: list[str]) -> None:
    """Refuse ``-e CKPT`` that S3PRL cannot resume or that belongs to another task than ``-d``.

    With ``-e``, S3PRL takes the task from the checkpoint, so a checkpoint of another downstream
    would silently run that task's code; say so in one line instead.
    """
    known, _ = _known_arguments().parse_known_args(argv)
    if not known.past_exp:
        return
    import torch

    path = Path(known.past_exp)
    if not path.is_file():
        raise StimulusError(f"checkpoint {path} (-e) does not exist: pass e.g. EXPDIR/dev-best.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu")
        task = vars(checkpoint["Args"]).get("downstream")
    except Exception as error:  # unpickling fails in many ways; all mean "not an S3PRL downstream checkpoint"
        raise StimulusError(f"{path} is not an S3PRL downstream checkpoint ({type(error).__name__}): pass a file saved by run_downstream") from None
    if known.downstream and task != known.downstream:
        raise StimulusError(f"checkpoint {path} was trained for downstream {task!r}, not {known.downstream!r}: pass a checkpoint of this task")


def check_inputs(argv: list[str]) -> None:
    """What S3PRL would otherwise fail on with a traceback, after its start-up: the seed, a training
    expdir that cannot be written, and a damaged checkpoint that ``-a`` would resume from."""
    known, _ = _known_arguments().parse_known_args(argv)
    if known.help:
        return
    for option, value in (("--seed", known.seed), ("-o args.seed", _override(known.override, "args.seed"))):
        if value is not None:
            check_seed(value, option)
    if known.mode == "train" and not known.past_exp:
        check_writable_dir(_expdir(known), "-p" if known.expdir else "-n")
    if known.auto_resume and not known.past_exp:
        check_resumable(Path(_expdir(known)))


def _expdir(known) -> str:
    return known.expdir or f"result/downstream/{known.expname}"


def _override(override: str | None, key: str) -> str | None:
    """The value S3PRL's ``-o "a.b=V,,c=W"`` gives ``key``, if any (the last one wins, as in S3PRL)."""
    value = None
    for item in (override or "").split(",,"):
        name, sep, text = item.partition("=")
        if sep and name.strip() == key:
            value = text.strip().strip("'\"")
    return value


def check_resumable(expdir: Path) -> None:
    """Refuse ``-a`` when the ``states-*.ckpt`` S3PRL would resume from (the highest step) is damaged.

    torch checkpoints are zip archives whose directory is at the end, so a file cut short by a kill or a
    full disk fails to open as a zip: checked in milliseconds, without loading the weights.
    """
    states = sorted(expdir.glob("states-*.ckpt"), key=_step_of)
    if not states:
        return
    latest = states[-1]
    try:
        with zipfile.ZipFile(latest):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        earlier = f"delete it to resume from {states[-2].name}" if len(states) > 1 else "delete it to restart the run"
        raise StimulusError(f"-a would resume from {latest}, which is damaged ({type(error).__name__}: truncated or not "
                            f"a torch checkpoint): {earlier}") from None


def _training_expdir(argv: list[str]) -> Path | None:
    """The expdir a training run writes to: ``-p``/``-n``, or with ``-e CKPT`` the checkpoint's folder."""
    known, _ = _known_arguments().parse_known_args(argv)
    if known.mode != "train" or known.help:
        return None
    return Path(known.past_exp).parent if known.past_exp else Path(_expdir(known))


def _clear_interrupted(argv: list[str]) -> list[str]:
    """Before S3PRL starts (no process writes in the expdir yet), delete what killed writes left there."""
    expdir = _training_expdir(argv)
    removed = [] if expdir is None else clear_interrupted_writes(expdir)
    if not removed:
        return []
    return [f"{expdir}: removed {len(removed)} leftover temporary file(s) of an interrupted write "
            f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})"]


def _step_of(path: Path) -> int:
    # S3PRL's own ordering: the number after the last '-' of the file name.
    try:
        return int(path.name.split("-")[-1].split(".")[0])
    except ValueError:
        return -1


def _torch_version() -> str:
    import torch

    return torch.__version__


def _is_leader(environ) -> bool:
    return environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``s3prl-stimulus-run-downstream <S3PRL run_downstream arguments>``."""
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack
    from s3prl_stimulus.integration.registration import install_alias

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, notes = resolve_arguments(argv)
        check_inputs(argv)
        prepare_s3prl_stack()
        check_past_checkpoint(argv)
    except StimulusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    install_alias()
    atomic_checkpoint_saves()
    if _is_leader(os.environ):
        notes += _clear_interrupted(argv)
        for note in notes:
            print(f"{NOTE} {note}", file=sys.stderr)
    if "-h" in argv or "--help" in argv:
        print(
            f"{NOTE} S3PRL's run_downstream, launched with compatibility shims (docs/s3prl_stack.md). "
            "Defaults added: -c <packaged config> for -d emotion_stimulus, --device cpu without CUDA, "
            "--local_rank $LOCAL_RANK under torchrun.\n"
        )
    s3prl_run_downstream = importlib.import_module("s3prl.run_downstream")
    sys.argv = [s3prl_run_downstream.__file__, *argv]
    try:
        s3prl_run_downstream.main()
    except StimulusError as error:  # bad input found by the downstream: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        known, _ = _known_arguments().parse_known_args(argv)
        message = fetch_failure(error, known.upstream)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
