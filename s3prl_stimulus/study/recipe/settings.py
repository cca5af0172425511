"""What a study is: its upstreams (``NAME``, ``NAME:CKPT``, ``LABEL=NAME:CKPT``), the checked settings of its
grid, and the paper's defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from s3prl_stimulus import STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.hub_entries import WAVEFORM_FEATURES, local_entry
from s3prl_stimulus.partition import check_fold
from s3prl_stimulus.seeds import check_seed

PATHS = ("s3prl", "cache", "authors")
"""Training paths; ``authors`` imports the paper authors' released models instead of training (study.authors)."""
PAPER_UPSTREAMS = (
    "wavlm_large", "xls_r_1b", "hubert_large_ll60k", "wav2vec2_large_ll60k", "data2vec_large_ll60k", "decoar2",
    "wav2vec2_large_lv60_cv_swbd_fsh", "wav2vec", "apc", "vq_apc", "tera", "mockingjay", "npc", "modified_cpc", "fbank",
)
"""The paper's 14 SSL upstreams + FBANK, in S3PRL's names (recipes/upstreams.txt lists the same)."""
DEFAULT_SEEDS = (1337,)
"""S3PRL's own default ``--seed``: one run per (upstream, stimulus, fold), as in the paper."""
DATARC = "config.downstream_expert.datarc"
RECIPE_OWNED_OPTIONS = ("audio_dir", "fold", "train_stimulus", "votes", "clips", "upstream_label")
"""datarc options the recipe sets for every run (use its own options to change them, not --override)."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Upstream:
    """One line of the upstream list: ``NAME``, ``NAME:CKPT`` or ``LABEL=NAME[:CKPT]``.

    ``name`` is S3PRL's ``-u``, ``ckpt`` its ``-k`` (a local file, made absolute, or a URL), ``label`` the
    directory the runs go to and the name every results JSON carries as ``upstream_label``, which the report
    shows them under (default: the name as listed). S3PRL's entries for the paper's upstreams drop
    ``-k`` (they load their own download), so one listed with a file runs as the hub entry that reads it:
    ``wavlm_large:/m/w.pt`` is ``-u wavlm_local -k /m/w.pt`` under ``wavlm_large/``
    (:data:`s3prl_stimulus.integration.hub_entries.LOCAL_ENTRY`).
    """

    name: str
    ckpt: Optional[str] = None
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if self.ckpt is None:
            return
        listed = f"upstream {self.label}={self.name}:{self.ckpt}"
        if self.name in WAVEFORM_FEATURES:
            raise StimulusError(f"{listed}: {self.name} is computed from the waveform and takes no checkpoint: "
                                f"list it as {self.name}")
        local = local_entry(self.name)
        if local and "://" in self.ckpt:
            raise StimulusError(f"{listed}: S3PRL's {self.name} ignores a checkpoint URL and downloads its own weights: "
                                f"list {self.name} alone, or download the file and list {self.name}:/path/to/file")
        if local:
            object.__setattr__(self, "name", local)

    @property
    def local_ckpt(self) -> bool:
        return self.ckpt is not None and "://" not in self.ckpt


def parse_upstream(spec: str, base: Path = Path(".")) -> Upstream:
    """``NAME``, ``NAME:CKPT`` or ``LABEL=NAME[:CKPT]`` (relative checkpoints are taken from ``base``)."""
    text = spec.strip()
    label = ""
    head, sep, rest = text.partition("=")
    if sep and _LABEL.fullmatch(head) and ":" not in head:
        label, text = head, rest
    name, sep, ckpt = text.partition(":")
    if not _NAME.fullmatch(name) or (sep and not ckpt):
        raise StimulusError(f"upstream {spec!r}: write NAME, NAME:CKPT or LABEL=NAME:CKPT (e.g. wavlm_large, "
                            "wavlm_local:/models/wavlm.pt, mine=wavlm_local:/models/wavlm.pt)")
    if ckpt and "://" not in ckpt:
        ckpt = str((base / Path(ckpt).expanduser()).resolve())
    return Upstream(name, ckpt or None, label)


def read_upstreams(spec: str) -> tuple[Upstream, ...]:
    """Upstreams from a list file (one per line, ``#`` comments) or a comma/space-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        items, base = [line for line in lines if line], path.resolve().parent
    else:
        items, base = [item for item in re.split(r"[,\s]+", spec) if item], Path(".")
    if not items:
        raise StimulusError(f"no upstreams in {spec!r}: give a list file (one NAME[:CKPT] per line) "
                            "or names like fbank,wavlm_large")
    upstreams = tuple(parse_upstream(item, base) for item in items)
    labels = [u.label for u in upstreams]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise StimulusError(f"upstream directory {twice[0]!r} is listed twice: give each entry its own label, "
                            f"e.g. a={twice[0]}:/path/a.pt and b={twice[0]}:/path/b.pt")
    return upstreams


@dataclass(frozen=True)
class Settings:
    """Everything that defines the grid and how its commands are spelled."""

    path: str
    root: Path
    corpus: Path
    upstreams: tuple
    stimuli: tuple
    folds: tuple
    seeds: tuple
    votes: str = "paper"
    clips: str = "all"
    override: str = ""
    features: Optional[Path] = None
    python: str = sys.executable
    device: Optional[str] = None
    authors: Optional[Path] = None  # --path authors: the authors' results tree (or one checkpoint) to import

    def __post_init__(self):
        if self.features is None:
            object.__setattr__(self, "features", self.root / "features")

    def to_json(self) -> dict:
        obj = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        obj.update(root=str(self.root), corpus=str(self.corpus), features=str(self.features),
                   authors=None if self.authors is None else str(self.authors),
                   upstreams=[dataclasses.asdict(u) for u in self.upstreams],
                   stimuli=list(self.stimuli), folds=list(self.folds), seeds=list(self.seeds))
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "Settings":
        obj = dict(obj)
        obj.update(root=Path(obj["root"]), corpus=Path(obj["corpus"]), features=Path(obj["features"]),
                   upstreams=tuple(Upstream(**u) for u in obj["upstreams"]),
                   stimuli=tuple(obj["stimuli"]), folds=tuple(obj["folds"]), seeds=tuple(obj["seeds"]),
                   authors=Path(obj["authors"]) if obj.get("authors") else None)
        return cls(**obj)


def split_list(values) -> list[str]:
    """``["voice,face", "av"]`` or ``"voice face"`` → ``["voice", "face", "av"]``."""
    values = [values] if isinstance(values, str) else list(values or [])
    return [item for value in values for item in re.split(r"[,\s]+", str(value)) if item]


def check_stimuli(values) -> tuple:
    stimuli = tuple(dict.fromkeys(split_list(values)))
    unknown = [s for s in stimuli if s not in STIMULI]
    if unknown or not stimuli:
        raise StimulusError(f"train stimuli {unknown or stimuli!r}: choose from {', '.join(STIMULI)}")
    return stimuli


def check_seeds(values) -> tuple:
    seeds = tuple(dict.fromkeys(check_seed(s, "--seeds") for s in split_list(values)))
    if not seeds:
        raise StimulusError("no seeds given: pass e.g. --seeds 1337")
    return seeds


def check_override(override: str) -> str:
    """The user's extra S3PRL ``-o`` options; the grid's own datarc options are refused (they come from the recipe)."""
    options = [o.strip() for o in (override or "").split(",,") if o.strip()]
    for option in options:
        key = option.split("=", 1)[0].strip()
        if option.count("=") != 1 or not key.startswith(("config.", "args.")):
            raise StimulusError(f"--override {option!r}: write S3PRL options as config.a.b=VALUE (one '='), "
                                "joined by ',,'")
        owned = [name for name in RECIPE_OWNED_OPTIONS if key == f"{DATARC}.{name}"]
        if owned or key in ("args.expdir", "args.seed", "args.upstream", "args.upstream_ckpt"):
            raise StimulusError(f"--override {key}: the recipe sets it for every run; use the recipe's own option "
                                "(--corpus, --folds, --stimuli, --votes, --clips, --seeds, --upstreams [LABEL=], "
                                "--root)")
    return ",,".join(options)


def override_value(override: str, key: str) -> Optional[str]:
    """The raw value the user's ``-o`` gives ``key`` (None when absent)."""
    for option in (override or "").split(",,"):
        name, _, value = option.partition("=")
        if name.strip() == key:
            return value.strip()
    return None


def _checked_path(value, option: str) -> Path:
    path = Path(value).expanduser().resolve()
    if "=" in str(path) or ",," in str(path):
        raise StimulusError(f"{option} {path}: S3PRL's -o cannot carry a path containing '=' or ',,'; "
                            "use another directory")
    return path


def make_settings(args: argparse.Namespace) -> Settings:
    if args.path not in PATHS:
        raise StimulusError(f"--path {args.path!r}: choose s3prl, cache or authors")
    folds = tuple(dict.fromkeys(check_fold(k) for k in split_list(args.folds)))
    if not folds:
        raise StimulusError("no folds given: pass e.g. --folds 1,2,3,4,5")
    clips = args.clips
    if clips not in ("all", "present"):
        clips = str(_checked_path(clips, "--clips"))
        if not Path(clips).is_file():
            raise StimulusError(f"--clips {args.clips}: give all, present or a file listing clip names")
    votes = args.votes
    if votes not in ("paper", "crema-d"):
        votes = str(_checked_path(votes, "--votes"))
    return Settings(
        path=args.path, root=_checked_path(args.root, "--root"), corpus=_checked_path(args.corpus, "--corpus"),
        upstreams=read_upstreams(args.upstreams), stimuli=check_stimuli(args.stimuli), folds=folds,
        seeds=check_seeds(args.seeds), votes=votes, clips=clips, override=check_override(args.override),
        features=_checked_path(args.features, "--features") if args.features else None,
        python=args.python, device=args.device,
        authors=_checked_path(args.authors, "--authors") if getattr(args, "authors", None) else None,
    )
