"""Make S3PRL 0.4.18 run unchanged on today's torch / torchaudio / huggingface_hub stacks.

S3PRL's ``run_downstream`` was written for torch 1.x. On current stacks it fails before any
downstream code runs (facts measured in ``docs/s3prl_stack.md``):

- torchaudio >= 2.9 removed ``set_audio_backend`` (called by ``run_downstream.main`` and, at import
  time, by the BYOL-S upstream) and ``sox_effects`` (imported by the MOS-prediction upstream);
- a torchaudio wheel built for another torch cannot load its compiled extension, so
  ``import torchaudio`` raises ``OSError`` although S3PRL only needs its pure-Python parts
  (``compliance.kaldi`` for fbank/mfcc, ``transforms``, ``functional``);
- huggingface_hub >= 1.0 removed ``HfFolder`` and ``Repository``, imported at module level by
  ``run_downstream`` and the runner (they are only used to push results to the Hub);
- torch >= 2.6 loads checkpoints with ``weights_only=True``, which rejects the
  ``argparse.Namespace`` every S3PRL checkpoint stores under ``Args`` (``-e``, ``-a``, ``-i``) and the
  numpy numbers some upstream checkpoints hold; and S3PRL's WavLM/DeCoAR 2 experts load without
  ``map_location``, so GPU-saved weights fail without CUDA (:mod:`s3prl_stimulus.integration.checkpoints`).

:func:`prepare_s3prl_stack` patches exactly these, each only when it is missing, and must run
before anything imports S3PRL (the launcher, :mod:`s3prl_stimulus.integration.launcher`, calls it first).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
import warnings

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration import checkpoints

log = logging.getLogger("s3prl_stimulus")

_applied: tuple[str, ...] | None = None

S3PRL_RUNTIME = ("s3prl", "yaml", "tensorboardX", "huggingface_hub", "omegaconf", "transformers")
"""Top-level modules that ``s3prl.run_downstream`` imports (directly or through ``s3prl.hub``)."""

INSTALL_HINT = (
    "pip install 's3prl-stimulus[s3prl]', then pip install --no-deps s3prl==0.4.18 torchaudio==<your torch's release, "
    "or 2.11.0> (docs/s3prl_stack.md)"
)


SHIMS = {
    "torchaudio-without-extension": "this torchaudio was built for another torch: only its pure-Python parts are used",
    "torchaudio.set_audio_backend": "removed in torchaudio 2.9; S3PRL calls it (a no-op here)",
    "torchaudio.sox_effects": "removed in torchaudio 2.9; S3PRL's MOS upstream imports it (a stand-in that fails if called)",
    "huggingface_hub.HfFolder": "removed in huggingface_hub 1.0; imported by S3PRL's runner (Hub upload only)",
    "huggingface_hub.Repository": "removed in huggingface_hub 1.0; imported by S3PRL's runner (Hub upload only)",
    "torch.load-allow-list": "torch >= 2.6 loads weights only: argparse.Namespace and numpy numbers of S3PRL's checkpoints allowed",
    "torch.load-cpu-map-and-one-line-refusals": "GPU-saved weights map to the CPU without CUDA; other refused classes named in one line",
}
"""What each name :func:`prepare_s3prl_stack` returns patches, and why (``s3prl-stimulus doctor`` prints it)."""


def prepare_s3prl_stack() -> tuple[str, ...]:
    """Patch the running interpreter so S3PRL 0.4.18 imports and runs; return the shims applied.

    Idempotent: later calls return the same names and only re-check the ``torch.load`` allow-list
    (leaving a ``with torch.serialization.safe_globals([argparse.Namespace])`` block removes
    Namespace process-wide, even though it was allowed before). Raises :class:`StimulusError` when a
    module S3PRL needs is not installed at all.
    """
    global _applied
    if _applied is not None:
        checkpoints.allow_checkpoint_classes()
        return _applied
    _check_runtime_installed()
    applied = []
    torchaudio, without_extension = _import_torchaudio()
    if without_extension:
        applied.append("torchaudio-without-extension")
    if _add_set_audio_backend(torchaudio):
        applied.append("torchaudio.set_audio_backend")
    if _add_sox_effects_stub(torchaudio):
        applied.append("torchaudio.sox_effects")
    applied.extend(_add_huggingface_hub_names(importlib.import_module("huggingface_hub")))
    if checkpoints.allow_checkpoint_classes():
        applied.append("torch.load-allow-list")
    if checkpoints.install():
        applied.append("torch.load-cpu-map-and-one-line-refusals")
    _silence_known_deprecations()
    _applied = tuple(applied)
    return _applied


def _check_runtime_installed() -> None:
    missing = [name for name in S3PRL_RUNTIME + ("torchaudio",) if importlib.util.find_spec(name) is None]
    if missing:
        raise StimulusError(f"S3PRL's run_downstream needs {', '.join(missing)}, not installed in {sys.prefix}: {INSTALL_HINT}")


# ---------------------------------------------------------------- torchaudio


def _import_torchaudio() -> tuple[types.ModuleType, bool]:
    """Import torchaudio; if its compiled extension cannot load, import its pure-Python parts only.

    Returns the module and whether the fallback was needed. Any other import failure propagates.
    """
    if "torchaudio" in sys.modules:
        module = sys.modules["torchaudio"]
        return module, getattr(getattr(module, "_extension", None), "_s3prl_stimulus_stub", False)
    try:
        return importlib.import_module("torchaudio"), False
    except (OSError, ImportError, RuntimeError) as error:
        if not _raised_by_extension_loader(error):
            raise
        reason = _one_line(error)
    _forget_torchaudio_modules()
    sys.modules["torchaudio._extension"] = _extension_stub()
    try:
        module = importlib.import_module("torchaudio")
    except Exception:
        _forget_torchaudio_modules()
        raise
    import torch

    # A supported set-up (README, "Supported stacks"), not a fault: said only at the verbose level.
    _notice(
        f"torchaudio {getattr(module, '__version__', '?')} was built for another torch than this one "
        f"({torch.__version__}), so only its pure-Python parts are used; that is all S3PRL needs here "
        "(fbank and MFCC features work; sox effects, forced alignment and CTC decoders are unavailable). "
        f"Loader message: {reason[:300]}"
    )
    return module, True


VERBOSE_ENV = "S3PRL_STIMULUS_VERBOSE"


def _notice(message: str) -> None:
    """Log at INFO; also print to stderr when ``S3PRL_STIMULUS_VERBOSE`` is set (any value but 0/empty)."""
    log.info(message)
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        print(f"[s3prl-stimulus] {message}", file=sys.stderr)


def _raised_by_extension_loader(error: BaseException) -> bool:
    """Whether the failure comes from loading torchaudio's shared libraries (torchaudio/_extension)."""
    frames = []
    current: BaseException | None = error
    while current is not None:
        frames.extend(frame.filename for frame in _traceback_frames(current))
        current = current.__cause__ or current.__context__
    return any("torchaudio" in name and "_extension" in name for name in (f.replace("\\", "/") for f in frames))


def _one_line(error: BaseException) -> str:
    # The loader's OSError names the .so; its cause names the library that is really missing.
    text = f"{type(error).__name__}: {error}"
    if error.__cause__ is not None:
        text += f" ({error.__cause__})"
    return " ".join(text.split())


def _traceback_frames(error: BaseException):
    import traceback

    return traceback.extract_tb(error.__traceback__)


def _forget_torchaudio_modules() -> None:
    # A failed import leaves submodules (e.g. torchaudio._internal) behind; a second import must start clean.
    for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
        del sys.modules[name]


def _extension_stub() -> types.ModuleType:
    """Stand-in for ``torchaudio._extension`` saying the compiled extension is unavailable.

    torchaudio's own modules read exactly these names (``functional.filtering`` checks
    ``_IS_TORCHAUDIO_EXT_AVAILABLE`` and falls back to Python loops; ``functional._alignment``
    decorates with ``fail_if_no_align``).
    """
    stub = types.ModuleType("torchaudio._extension", "torchaudio's compiled extension, unavailable (s3prl_stimulus.integration.compat)")
    stub._s3prl_stimulus_stub = True
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub._IS_ALIGN_AVAILABLE = False
    stub._load_lib = lambda lib: False
    stub._check_cuda_version = lambda: None
    stub._init_dll_path = lambda: None

    def fail_if_no_align(function):
        def unavailable(*args, **kwargs):
            raise RuntimeError(
                f"torchaudio.{function.__name__} needs torchaudio's compiled extension, which does not match the "
                "installed torch: install the torchaudio release built for your torch"
            )

        unavailable.__name__ = function.__name__
        unavailable.__doc__ = function.__doc__
        return unavailable

    stub.fail_if_no_align = fail_if_no_align
    return stub


def _add_set_audio_backend(torchaudio: types.ModuleType) -> bool:
    # Removed in torchaudio 2.9. S3PRL asks for "sox_io" but reads audio itself in the paths we use.
    if hasattr(torchaudio, "set_audio_backend"):
        return False

    def set_audio_backend(backend=None):
        """No-op stand-in (torchaudio >= 2.9 has no backend dispatch), added by s3prl_stimulus.integration.compat."""

    torchaudio.set_audio_backend = set_audio_backend
    return True


def _add_sox_effects_stub(torchaudio: types.ModuleType) -> bool:
    # Removed in torchaudio 2.9; imported at module level by S3PRL's MOS-prediction upstream.
    try:
        importlib.import_module("torchaudio.sox_effects")
        return False
    except ImportError:
        pass

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            "torchaudio.sox_effects was removed in torchaudio 2.9; this S3PRL code path needs torchaudio<2.9 "
            "(with its matching torch)"
        )

    stub = types.ModuleType("torchaudio.sox_effects", "removed in torchaudio 2.9; stand-in by s3prl_stimulus.integration.compat")
    stub.apply_effects_tensor = unavailable
    stub.apply_effects_file = unavailable
    stub.effect_names = lambda: []
    sys.modules["torchaudio.sox_effects"] = stub
    torchaudio.sox_effects = stub
    return True


# ---------------------------------------------------------------- huggingface_hub


class _HfFolderStandIn:
    """``HfFolder`` as huggingface_hub < 1.0 had it, for S3PRL's (Hub upload only) use."""

    @staticmethod
    def get_token():
        import huggingface_hub

        return huggingface_hub.get_token()

    @staticmethod
    def save_token(token: str) -> None:
        from pathlib import Path

        from huggingface_hub import constants

        path = Path(constants.HF_TOKEN_PATH)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)

    @staticmethod
    def delete_token() -> None:
        from pathlib import Path

        from huggingface_hub import constants

        Path(constants.HF_TOKEN_PATH).unlink(missing_ok=True)


class _RepositoryStandIn:
    """``Repository`` was removed in huggingface_hub 1.0; S3PRL uses it only for ``--push_to_hf_hub``."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "S3PRL's --push_to_hf_hub needs huggingface_hub.Repository, removed in huggingface_hub 1.0: "
            "pip install 'huggingface_hub<1.0' 'transformers<5', or upload the expdir with `hf upload`"
        )


def _add_huggingface_hub_names(hub: types.ModuleType) -> list[str]:
    added = []
    for name, stand_in in (("HfFolder", _HfFolderStandIn), ("Repository", _RepositoryStandIn)):
        try:
            getattr(hub, name)
        except (AttributeError, ImportError):
            setattr(hub, name, stand_in)
            added.append(f"huggingface_hub.{name}")
    return added


# ---------------------------------------------------------------- torch


def _silence_known_deprecations() -> None:
    # S3PRL's runner calls torch.cuda.amp.autocast(enabled=...) every step; torch warns it is deprecated.
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated", category=FutureWarning)
