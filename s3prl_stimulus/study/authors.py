"""The authors' released models: their S3PRL ``emo`` checkpoints, checked and rewritten as this package's.

The paper's authors trained with S3PRL's ``emo`` downstream and released one ``dev-best.ckpt`` per
``<upstream>_<corpus>_fold<N>_multimodal`` folder. Facts of that format (issue 11):

- ``Args.downstream == "emo"``, ``Args.upstream`` the hub name (``wavlm_large``);
- ``Config["downstream_expert"]["datarc"]["test_fold"] == "fold<N>"``, N = 1..20 in four blocks of five:
  voice, audio-visual, all-inclusive, face; within a block EMO-SUPERB's folds 1..5 in order (:func:`fold_of`);
- ``Downstream``: ``projector.{weight [256, D], bias [256]}``, ``model.post_net.linear.{weight [6, 256],
  bias [6]}`` and the buffer ``best_score [1]``; ``Featurizer`` the layer weights; ``Step`` the step.

Their head is the paper's head of :mod:`s3prl_stimulus.downstream.emotion_stimulus.model` (Linear, mean over
frames, Linear) and their waveform normalisation is ours, so their parameters move across unchanged.
:func:`import_checkpoints` writes each as a runner checkpoint of ``emotion_stimulus`` in the recipe's layout
``OUT/<name>/<train_stimulus>/fold<k>/seed<s>/dev-best.ckpt`` (``seed<s>``: the seed their run was trained
with, ``Args.seed``, S3PRL's 1337 by default), which both evaluation paths read.

Nobody fingerprinted the upstream weights they were trained on, so the checkpoint records the upstream the
user names at import (``--upstream``/``--upstream-ckpt``) as unverified (:mod:`..integration.identity`):
every number computed from it says so. The source file and its SHA-256 are recorded in the checkpoint
(``Downstream["_extra_state"]["imported_from"]``) and in ``import.json`` beside it.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import (EXTRA_STATE_KEY, IMPORT_KEY, UpstreamIdentity, checkpoint_state)
from s3prl_stimulus.io import atomic_path, sha256_file, write_json_atomic

AUTHORS_DOWNSTREAM = "emo"
BLOCKS = ("voice", "av", "all", "face")
"""Train stimulus of the authors' test_fold blocks 1-5, 6-10, 11-15, 16-20."""
FOLDS_PER_BLOCK = 5
PROJECTOR_DIM = 256
DEFAULT_SEED = 1337  # S3PRL's --seed default, when their Args carry none
CHECKPOINT_NAME = "dev-best.ckpt"
RECORD_NAME = "import.json"
LABEL_SUFFIX = " (authors)"
FOLDER = re.compile(r"_fold(\d+)_multimodal$")
HEAD_KEYS = {
    "projector.weight": "head.projector.weight",
    "projector.bias": "head.projector.bias",
    "model.post_net.linear.weight": "head.model.post_net.linear.weight",
    "model.post_net.linear.bias": "head.model.post_net.linear.bias",
}
"""The authors' ``Downstream`` names → the ``emotion_stimulus`` expert's (its head is ``self.head``)."""


def fold_of(n: int) -> tuple[str, int]:
    """The authors' test_fold N → (train stimulus, EMO-SUPERB fold)."""
    if not 1 <= n <= len(BLOCKS) * FOLDS_PER_BLOCK:
        raise ValueError(n)
    return BLOCKS[(n - 1) // FOLDS_PER_BLOCK], (n - 1) % FOLDS_PER_BLOCK + 1


@dataclass(frozen=True)
class AuthorsCheckpoint:
    """One checked checkpoint of the authors."""

    path: Path
    sha256: str
    n: int
    upstream: str
    seed: int
    step: int
    state: dict  # the loaded file

    @property
    def train_stimulus(self) -> str:
        return fold_of(self.n)[0]

    @property
    def fold(self) -> int:
        return fold_of(self.n)[1]


# --- reading and checking their files ------------------------------------------------------------


def find_checkpoints(source) -> list[Path]:
    """``source`` itself (a file) or every ``dev-best.ckpt`` under it (their results tree)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise StimulusError(f"{source} does not exist: pass one of the authors' dev-best.ckpt files or the folder "
                            "holding their <upstream>_<corpus>_fold<N>_multimodal folders")
    found = sorted(source.rglob(CHECKPOINT_NAME))
    if not found:
        raise StimulusError(f"no {CHECKPOINT_NAME} under {source}: pass the folder the authors' zip unpacks to "
                            "(its <upstream>_<corpus>_fold<N>_multimodal folders)")
    return found


def load_file(path: Path) -> dict:
    """Their checkpoint, under ``weights_only`` with the plain-data classes S3PRL checkpoints hold."""
    import pickle

    import torch

    from s3prl_stimulus.integration.checkpoints import refusal_message, safe_globals

    try:
        with torch.serialization.safe_globals(safe_globals()):  # weights_only by default: the refusal's fix can lift it
            return torch.load(path, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise StimulusError(refusal_message(path, str(error))) from None
    except Exception as error:  # truncated file, not a torch file
        raise StimulusError(f"cannot load {path} ({type(error).__name__}: {str(error)[:120]}): "
                            "pass an unmodified dev-best.ckpt of the authors' zip") from None


def read_checkpoint(path) -> AuthorsCheckpoint:
    """One of their checkpoints, checked against the facts above; anything else refused in one line."""
    path = Path(path)
    state = load_file(path)
    refuse = _refuser(path)
    if not isinstance(state, dict):
        refuse(f"holds a {type(state).__name__}, not an S3PRL checkpoint")
    for key in ("Args", "Config", "Downstream"):
        if key not in state:
            refuse(f"has no {key!r} entry, so it is not an S3PRL downstream checkpoint")
    args = state["Args"]
    if getattr(args, "downstream", None) != AUTHORS_DOWNSTREAM:
        refuse(f"was trained for downstream {getattr(args, 'downstream', None)!r}, not the authors' {AUTHORS_DOWNSTREAM!r}")
    upstream = getattr(args, "upstream", None)
    if not isinstance(upstream, str) or not upstream:
        refuse("names no upstream (Args.upstream)")
    if getattr(args, "upstream_feature_selection", "hidden_states") != "hidden_states" \
            or getattr(args, "upstream_layer_selection", None) is not None:
        refuse("selects other upstream features than the weighted sum of all hidden states (-s/-l)")
    n = _test_fold(state["Config"], refuse)
    _check_folder(path, n, refuse)
    _check_head(state["Downstream"], refuse)
    _check_featurizer(state.get("Featurizer"), refuse)
    seed = getattr(args, "seed", DEFAULT_SEED)
    seed = DEFAULT_SEED if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        refuse(f"has seed {seed!r} (Args.seed), not an integer")
    step = state.get("Step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        refuse(f"has step {step!r}, not a count")
    return AuthorsCheckpoint(path, sha256_file(path), n, upstream, seed, step, state)


def _refuser(path):
    def refuse(what: str):
        raise StimulusError(f"{path} {what}: it is not one of the authors' released checkpoints "
                            f"(S3PRL '{AUTHORS_DOWNSTREAM}' downstream, test_fold fold1..fold20); pass their unmodified files")
    return refuse


def _test_fold(config, refuse) -> int:
    try:
        text = config["downstream_expert"]["datarc"]["test_fold"]
    except (KeyError, TypeError):
        refuse("has no Config.downstream_expert.datarc.test_fold")
    found = re.fullmatch(r"fold(\d+)", str(text))
    n = int(found.group(1)) if found else None
    if n is None or not 1 <= n <= len(BLOCKS) * FOLDS_PER_BLOCK:
        refuse(f"has test_fold {text!r}, outside fold1..fold{len(BLOCKS) * FOLDS_PER_BLOCK}")
    return n


def _check_folder(path: Path, n: int, refuse) -> None:
    """Their folder names the fold too: a folder saying another N means the files were moved around."""
    found = FOLDER.search(path.parent.name)
    if found and int(found.group(1)) != n:
        refuse(f"says test_fold fold{n} but sits in folder {path.parent.name} (fold{found.group(1)})")


def _check_head(downstream, refuse) -> None:
    import torch

    if not isinstance(downstream, dict):
        refuse("has no Downstream state dict")
    expected = set(HEAD_KEYS) | {"best_score"}
    missing, extra = sorted(expected - set(downstream)), sorted(set(downstream) - expected)
    if missing or extra:
        refuse(f"has a Downstream with missing keys {missing} and unexpected keys {extra} (not the paper's "
               "UtteranceLevel + MeanPooling head)")
    if not all(isinstance(downstream[k], torch.Tensor) for k in expected):
        refuse("has Downstream entries that are not tensors")
    weight = downstream["projector.weight"]
    dim = weight.shape[1] if weight.dim() == 2 else None
    shapes = {"projector.weight": (PROJECTOR_DIM, dim), "projector.bias": (PROJECTOR_DIM,),
              "model.post_net.linear.weight": (len(CLASSES), PROJECTOR_DIM),
              "model.post_net.linear.bias": (len(CLASSES),), "best_score": (1,)}
    for key, shape in shapes.items():
        if dim is None or tuple(downstream[key].shape) != shape:
            refuse(f"has Downstream {key} of shape {tuple(downstream[key].shape)}, not {shape}")


def _check_featurizer(featurizer, refuse) -> None:
    import torch

    if featurizer is None:
        return  # an upstream with one hidden state has no layer weights
    if not isinstance(featurizer, dict) or set(featurizer) - {"weights"}:
        refuse("has a Featurizer with other entries than the layer weights")
    weights = featurizer.get("weights")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.dim() != 1):
        refuse("has Featurizer weights that are not one weight per layer")


def read_all(sources: Sequence[Path]) -> list[AuthorsCheckpoint]:
    """Every checkpoint checked; one test_fold twice in a tree is refused (which one is theirs?)."""
    checkpoints = [read_checkpoint(p) for p in sources]
    seen = {}
    for checkpoint in checkpoints:
        key = (checkpoint.upstream, checkpoint.n)
        if key in seen:
            raise StimulusError(f"{seen[key]} and {checkpoint.path} are both test_fold fold{checkpoint.n} of "
                                f"{checkpoint.upstream}: keep one of them and import again")
        seen[key] = checkpoint.path
    return checkpoints


# --- writing ours ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    """What the evaluation needs that their files do not say."""

    upstream: Optional[str] = None  # -u for evaluation (default: theirs, e.g. wavlm_large, downloaded by S3PRL)
    upstream_ckpt: Optional[str] = None  # -k: a local weights file (with a local entry, e.g. wavlm_local)
    name: Optional[str] = None  # directory under --out (default: their upstream)
    label: Optional[str] = None  # upstream_label of every result (default: "<their upstream> (authors)")
    corpus: Optional[str] = None  # datarc.audio_dir written into the Config (else given with -o at evaluation)
    votes: str = "paper"
    clips: str = "all"  # datarc.clips: all | present | a clip-list file
    overwrite: bool = False


def checked_options(options: ImportOptions) -> ImportOptions:
    """The local weights file and the corpus named must exist."""
    ckpt = options.upstream_ckpt
    if ckpt and "://" not in ckpt and not Path(ckpt).is_file():
        raise StimulusError(f"--upstream-ckpt {ckpt} does not exist: pass the upstream's local weights file")
    if options.corpus and not Path(options.corpus).is_dir():
        raise StimulusError(f"--corpus {options.corpus} is not a directory: pass CREMA-D's AudioWAV folder")
    return options


def upstream_of(checkpoint: AuthorsCheckpoint, options: ImportOptions) -> str:
    """The ``-u`` of the evaluation: ``--upstream``, else theirs (its local entry when given a weights file)."""
    from s3prl_stimulus.integration.hub_entries import local_entry

    if options.upstream:
        return options.upstream
    if options.upstream_ckpt:
        return local_entry(checkpoint.upstream) or checkpoint.upstream
    return checkpoint.upstream


def output_path(out: Path, checkpoint: AuthorsCheckpoint, options: ImportOptions) -> Path:
    name = options.name or checkpoint.upstream
    return (Path(out) / name / checkpoint.train_stimulus / f"fold{checkpoint.fold}" / f"seed{checkpoint.seed}"
            / CHECKPOINT_NAME)


def import_record(checkpoint: AuthorsCheckpoint) -> dict:
    """Where the head came from; kept in the checkpoint and in ``import.json``."""
    best = checkpoint.state["Downstream"]["best_score"]
    return {"source": str(checkpoint.path.resolve()), "sha256": checkpoint.sha256, "format": "s3prl emo (authors)",
            "test_fold": checkpoint.n, "upstream": checkpoint.upstream, "step": checkpoint.step,
            "best_score": float(best.reshape(-1)[0])}


def identity_of(checkpoint: AuthorsCheckpoint, options: ImportOptions) -> UpstreamIdentity:
    upstream = upstream_of(checkpoint, options)
    ckpt = str(Path(options.upstream_ckpt).resolve()) if options.upstream_ckpt else None
    return UpstreamIdentity(upstream, ckpt, None, False,
                            f"upstream unverified: imported from the authors' checkpoint {checkpoint.path.resolve()} "
                            f"(sha256 {checkpoint.sha256[:12]}), trained on their {checkpoint.upstream}, whose weights "
                            f"nobody fingerprinted; named {upstream}{' -k ' + ckpt if ckpt else ''} at import")


def converted(checkpoint: AuthorsCheckpoint, options: ImportOptions, expdir: Path) -> dict:
    """Our runner checkpoint: the same parameters under the ``emotion_stimulus`` expert's names."""
    import torch

    theirs = checkpoint.state
    downstream = {"objective.class_weights": class_weights(checkpoint.fold, checkpoint.train_stimulus, options.votes),
                  **{ours: theirs["Downstream"][key].detach().to(torch.float32).clone().contiguous()
                     for key, ours in HEAD_KEYS.items()},
                  # unknown in their run (they kept dev accuracy): what a fresh expert starts from
                  "best_dev_loss": torch.tensor(float("inf"), dtype=torch.float64),
                  "best_dev_macro_f1": torch.tensor(float("-inf"), dtype=torch.float64),
                  EXTRA_STATE_KEY: checkpoint_state(identity_of(checkpoint, options))
                  | {IMPORT_KEY: import_record(checkpoint)}}
    featurizer = {k: v.detach().to(torch.float32).clone() for k, v in (theirs.get("Featurizer") or {}).items()}
    args = theirs["Args"]
    ours = argparse.Namespace(
        downstream="emotion_stimulus", upstream=upstream_of(checkpoint, options),
        upstream_ckpt=str(Path(options.upstream_ckpt).resolve()) if options.upstream_ckpt else None,
        upstream_feature_normalize=bool(getattr(args, "upstream_feature_normalize", False)),
        upstream_trainable=False, seed=checkpoint.seed, expdir=str(expdir.resolve()))
    return {"Featurizer": featurizer, "Downstream": downstream, "Step": checkpoint.step,
            "Epoch": int(theirs.get("Epoch", 0) or 0), "Config": config_for(checkpoint, options), "Args": ours}


def label_of(checkpoint: AuthorsCheckpoint, options: ImportOptions) -> str:
    return options.label or f"{checkpoint.upstream}{LABEL_SUFFIX}"


def config_for(checkpoint: AuthorsCheckpoint, options: ImportOptions) -> dict:
    """The packaged config (the paper's setup), for this fold and train stimulus, under the authors' label."""
    import yaml

    from s3prl_stimulus.integration.launcher import packaged_config

    config = copy.deepcopy(yaml.safe_load(packaged_config().read_text(encoding="utf-8")))
    datarc = config["downstream_expert"]["datarc"]
    datarc.update(fold=checkpoint.fold, train_stimulus=checkpoint.train_stimulus, votes=options.votes,
                  clips=options.clips, upstream_label=label_of(checkpoint, options))
    if options.corpus:
        datarc["audio_dir"] = str(Path(options.corpus).resolve())
    return config


def class_weights(fold: int, stimulus: str, votes: str):
    """The loss weights the expert computes for this fold's training labels (losses in the results use them)."""
    import torch

    from s3prl_stimulus.labels import binary_labels, load_votes
    from s3prl_stimulus.loss import class_balanced_weights
    from s3prl_stimulus.partition import split_clips

    counts = load_votes(votes).subset(split_clips(fold, "train")).counts(stimulus)
    return torch.as_tensor(class_balanced_weights(binary_labels(counts)), dtype=torch.float32)


def import_checkpoints(source, out, options: ImportOptions = ImportOptions()) -> list[Path]:
    """Check every checkpoint under ``source``, then write ours under ``out``; returns their paths.

    Everything is checked before anything is written. A target that exists is kept when it was imported
    from the same file (same SHA-256, same options: a rerun is a no-op) and refused otherwise, unless
    ``overwrite``.
    """
    options = checked_options(options)
    checkpoints = read_all(find_checkpoints(source))
    targets = [output_path(Path(out), c, options) for c in checkpoints]
    planned = [(c, t, converted(c, options, t.parent)) for c, t in zip(checkpoints, targets)]
    for checkpoint, target, state in planned:
        if target.exists() and not options.overwrite and not _same_import(target, state):
            raise StimulusError(f"{target} exists and was not imported from {checkpoint.path} with these options: "
                                "pass --overwrite to replace it, or another --out")
    for checkpoint, target, state in planned:
        if not options.overwrite and target.with_name(RECORD_NAME).is_file() and _same_import(target, state):
            continue  # a killed import wrote the checkpoint before its record: that one is written again
        _write(target, state, checkpoint, options)
    return targets


def _write(target: Path, state: dict, checkpoint: AuthorsCheckpoint, options: ImportOptions) -> None:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    record = import_record(checkpoint) | {"checkpoint": str(target), "train_stimulus": checkpoint.train_stimulus,
                                          "fold": checkpoint.fold, "seed": checkpoint.seed,
                                          "upstream_label": label_of(checkpoint, options),
                                          "upstream_identity": identity_of(checkpoint, options).record()}
    write_json_atomic(target.with_name(RECORD_NAME), record)


def _same_import(target: Path, state: dict) -> bool:
    """Whether ``target`` holds what this import would write (its record, args and config match)."""
    from s3prl_stimulus.downstream.emotion_stimulus.model import load_checkpoint

    try:
        saved = load_checkpoint(target)
    except StimulusError:
        return False
    extra = (saved.get("Downstream") or {}).get(EXTRA_STATE_KEY) or {}
    wanted = state["Downstream"][EXTRA_STATE_KEY]
    return extra == wanted and vars(saved.get("Args", argparse.Namespace())) == vars(state["Args"]) \
        and saved.get("Config") == state["Config"]


def imported_record(checkpoint: dict) -> Optional[dict]:
    """The import record of a checkpoint written here, or None."""
    extra = (checkpoint.get("Downstream") or {}).get(EXTRA_STATE_KEY)
    return extra.get(IMPORT_KEY) if hasattr(extra, "get") else None
