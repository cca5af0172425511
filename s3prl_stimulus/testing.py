"""Helpers for end-to-end tests: tiny random upstream checkpoints and generated CREMA-D-shaped corpora.

Nothing here downloads anything. Tests train through S3PRL on

- :func:`make_tiny_wavlm` (also :func:`make_tiny_hubert`, :func:`make_tiny_wav2vec2`): random-weight
  checkpoints built with S3PRL's own model classes, in the layout S3PRL's ``*_local`` upstreams load
  (``-u wavlm_local -k FILE``). The convolutional front end keeps the real 320x stride (50 frames
  per second), only its width and the transformer are shrunk, so frame counts match real models.
- :func:`make_corpus`: WAV files named like real CREMA-D clips with their real lengths (from the
  packaged manifest), filled with deterministic noise, so labels come from the packaged votes.
- :func:`tiny_clip_subset`: a few real clip names covering the splits of a fold (or of every fold).
- :func:`write_feature_cache`: a complete feature cache of given per-clip means, written by the cache
  module's own writer (sweep tests and benchmarks without an upstream).
"""

from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import atomic_path

SAMPLE_RATE = 16000
WAV_HEADER_BYTES = 44
"""CREMA-D's AudioWAV files are canonical 44-byte-header PCM16 WAVs: samples = (bytes - 44) / 2."""

CONV_STRIDE_LAYERS = "[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2"
"""wav2vec 2.0 / HuBERT / WavLM feature encoder: kernel/stride as in the real models (320x), width {c}."""

_EMOTION_IN_NAME = re.compile(r"^\d{4}_[A-Z]{3}_([A-Z]{3})_")


# ---------------------------------------------------------------- tiny upstreams


def _encoder_config(extractor_mode: str, layers: int, dim: int, conv_channels: int) -> dict:
    """Fields shared by wav2vec 2.0, HuBERT and WavLM configs, shrunk; the layer-norm extractor comes
    with pre-LN transformer and waveform normalisation, as in the Large models."""
    if extractor_mode not in ("default", "layer_norm"):
        raise StimulusError(f"extractor_mode {extractor_mode!r}: use 'default' (group norm, Base models) or 'layer_norm' (Large models)")
    if layers < 1 or dim < 4 or dim % 2:
        raise StimulusError(f"tiny upstream needs layers >= 1 and an even dim >= 4, got layers={layers}, dim={dim}")
    large_style = extractor_mode == "layer_norm"
    return {
        "extractor_mode": extractor_mode,
        "encoder_layers": layers,
        "encoder_embed_dim": dim,
        "encoder_ffn_embed_dim": 2 * dim,
        "encoder_attention_heads": 2,
        "conv_feature_layers": CONV_STRIDE_LAYERS.format(c=conv_channels),
        "conv_pos": 16,
        "conv_pos_groups": 2,
        "layer_norm_first": large_style,
        "normalize": large_style,
    }


def _save_checkpoint(path, payload: dict) -> Path:
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _seeded_model(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def make_tiny_wavlm(path, extractor_mode: str = "layer_norm", layers: int = 2, dim: int = 32, seed: int = 0) -> Path:
    """Write a random-weight WavLM checkpoint loadable with ``-u wavlm_local -k path``.

    Layout read by ``s3prl/upstream/wavlm/expert.py``: ``{"cfg": dict, "model": state_dict}``.
    Gated relative position embedding on, like the released WavLM models. The upstream gives
    ``layers + 1`` hidden states of width ``dim`` at 50 frames per second.
    """
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    cfg = _encoder_config(extractor_mode, layers, dim, conv_channels=32)  # validate before importing S3PRL
    prepare_s3prl_stack()
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg.update({"relative_position_embedding": True, "num_buckets": 32, "max_distance": 128, "gru_rel_pos": True})
    full_cfg = vars(WavLMConfig(cfg)).copy()
    model = _seeded_model(seed, lambda: WavLM(WavLMConfig(full_cfg)))
    return _save_checkpoint(path, {"cfg": full_cfg, "model": model.state_dict()})


def make_tiny_hubert(path, extractor_mode: str = "default", layers: int = 2, dim: int = 32, seed: int = 0) -> Path:
    """Write a random-weight HuBERT checkpoint loadable with ``-u hubert_local -k path``.

    Layout read by ``s3prl/upstream/hubert/convert.py``: ``task_cfg``, ``model_cfg``,
    ``model_weight`` and ``dictionaries_symbols`` (the k-means targets' symbols; unused for features).
    """
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    model_cfg = _encoder_config(extractor_mode, layers, dim, conv_channels=32)
    prepare_s3prl_stack()
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
    from s3prl.upstream.utils import merge_with_parent

    normalize = model_cfg.pop("normalize")
    model_cfg.update({"label_rate": 50.0, "final_dim": dim})
    task_cfg = {"label_rate": 50.0, "sample_rate": SAMPLE_RATE, "normalize": normalize}
    symbols = [[str(i) for i in range(8)]]
    model = _seeded_model(
        seed,
        lambda: HubertModel(merge_with_parent(HubertConfig, model_cfg), merge_with_parent(HubertPretrainingConfig, task_cfg), symbols),
    )
    payload = {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": model.state_dict(), "dictionaries_symbols": symbols}
    return _save_checkpoint(path, payload)


def make_tiny_wav2vec2(path, extractor_mode: str = "layer_norm", layers: int = 2, dim: int = 32, seed: int = 0) -> Path:
    """Write a random-weight wav2vec 2.0 checkpoint loadable with ``-u wav2vec2_local -k path``.

    Layout read by ``s3prl/upstream/wav2vec2/convert.py``: ``task_cfg``, ``model_cfg``, ``model_weight``.
    """
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    model_cfg = _encoder_config(extractor_mode, layers, dim, conv_channels=32)
    prepare_s3prl_stack()
    from s3prl.upstream.utils import merge_with_parent
    from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

    normalize = model_cfg.pop("normalize")
    model_cfg.update({"final_dim": dim, "latent_vars": 8, "latent_groups": 2, "latent_dim": 0})
    task_cfg = {"sample_rate": SAMPLE_RATE, "normalize": normalize}
    model = _seeded_model(seed, lambda: Wav2Vec2Model(merge_with_parent(Wav2Vec2Config, model_cfg)))
    return _save_checkpoint(path, {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": model.state_dict()})


# ---------------------------------------------------------------- S3PRL's plain path


_PLAIN_RUN = """\
import runpy, sys
from s3prl_stimulus.integration.compat import prepare_s3prl_stack
prepare_s3prl_stack()
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "s3prl_stimulus_alias", None)]
sys.argv = ["run_downstream.py"] + sys.argv[1:]
runpy.run_path("run_downstream.py", run_name="__main__")
"""


def plain_run_downstream_command(args: Sequence[str]) -> list[str]:
    """Command that runs S3PRL's own ``run_downstream.py`` file as ``python run_downstream.py ARGS`` does.

    It applies the compat shims (CI's torchaudio cannot load otherwise) and removes the alias finder,
    so ``-d emotion_stimulus`` is found only through a ``s3prl-stimulus register`` link. Run it with
    ``cwd=registration.s3prl_downstream_dir().parent`` (S3PRL's package folder), where S3PRL's default
    ``-c ./downstream/emotion_stimulus/config.yaml`` resolves through the link; pass ``-p`` and
    ``--device cpu`` yourself, as a plain S3PRL user would.
    """
    import sys

    return [sys.executable, "-c", _PLAIN_RUN, *args]


# ---------------------------------------------------------------- corpora


@functools.lru_cache(maxsize=1)
def _manifest_samples() -> dict:
    """Samples per CREMA-D clip, from the packaged AudioWAV manifest's file sizes."""
    from s3prl_stimulus.study.corpus import load_manifest

    manifest = load_manifest()
    samples = (manifest["bytes"] - WAV_HEADER_BYTES) // 2
    return dict(zip(manifest.index, samples.astype(int)))


def clip_samples(clip: str) -> int:
    """Length in samples of CREMA-D clip ``clip`` (e.g. ``1001_DFA_ANG_XX``)."""
    try:
        return _manifest_samples()[clip]
    except KeyError:
        raise StimulusError(f"{clip!r} is not a CREMA-D clip name (e.g. 1001_DFA_ANG_XX)") from None


def make_corpus(directory, clips: Iterable[str], seed: int = 0, max_seconds: float | None = None) -> list[Path]:
    """Write ``directory/<clip>.wav`` (16 kHz mono PCM16) for each clip, at its real CREMA-D length.

    Content is noise at a clip-specific level, a function of (seed, clip) only, so a clip is the
    same whatever else is generated with it. ``max_seconds`` truncates long clips (faster tests).
    Returns the paths in the order of ``clips``.
    """
    import soundfile as sf

    clips = list(clips)
    lengths = [clip_samples(clip) for clip in clips]  # validate every name before writing anything
    if max_seconds is not None:
        if max_seconds <= 0:
            raise StimulusError(f"max_seconds={max_seconds}: must be positive")
        lengths = [min(n, int(round(max_seconds * SAMPLE_RATE))) for n in lengths]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for clip, n in zip(clips, lengths):
        rng = np.random.default_rng([seed, zlib.crc32(clip.encode())])
        level = rng.uniform(0.02, 0.3)
        samples = np.clip(rng.normal(0.0, level, n), -1.0, 1.0)
        pcm = np.round(samples * 32767).astype(np.int16)
        path = directory / f"{clip}.wav"
        with atomic_path(path) as tmp:
            sf.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        paths.append(path)
    return paths


def tiny_clip_subset(n_per_split: int, fold: int | None = 1, seed: int = 0, votes: str = "paper") -> list[str]:
    """Real CREMA-D clip names: ``n_per_split`` from each of Train, Development and Test of ``fold``.

    With ``fold=None``, ``n_per_split`` clips from each of the five speaker blocks, so every fold
    has ``n`` test, ``n`` development and ``3n`` training clips. Within a split, clips are taken
    round-robin over the acted emotion in the name (ANG, DIS, FEA, HAP, NEU, SAD), preferring clips
    whose acted emotion is a positive label under every stimulus of ``votes``: a split of six or
    more clips then has a positive of every class for every label set (the class-balanced loss
    needs one per class). Deterministic given the arguments; sorted by name.
    """
    from s3prl_stimulus.partition import check_fold, load_partition

    if n_per_split < 1:
        raise StimulusError(f"n_per_split={n_per_split}: must be at least 1")
    clear = _clear_clips(votes)
    table = load_partition()
    if fold is None:
        # fold k tests on speaker block k: the fold columns' Test assignments are the five blocks
        groups = [table.index[table[f"fold{k}"] == "Test"] for k in range(1, 6)]
    else:
        column = f"fold{check_fold(fold)}"
        groups = [table.index[table[column] == split] for split in ("Train", "Development", "Test")]
    rng = np.random.default_rng(seed)
    chosen = []
    for group in groups:
        chosen.extend(_round_robin_by_emotion(sorted(group), n_per_split, rng, clear))
    return sorted(chosen)


_ACTED_CLASS = {"ANG": "angry", "SAD": "sad", "DIS": "disgust", "FEA": "fear", "NEU": "neutral", "HAP": "happy"}
"""CREMA-D's emotion code in a clip name → class."""


@functools.lru_cache(maxsize=4)
def _clear_clips(votes: str) -> frozenset:
    """Clips whose acted emotion is a positive label under every stimulus."""
    from s3prl_stimulus import CLASSES, STIMULI
    from s3prl_stimulus.labels import binary_labels, load_votes

    table = load_votes(votes)
    acted = np.array([CLASSES.index(_ACTED_CLASS[_EMOTION_IN_NAME.match(c).group(1)]) for c in table.clips])
    clear = np.ones(len(acted), dtype=bool)
    for stimulus in STIMULI:
        clear &= binary_labels(table.counts(stimulus))[np.arange(len(acted)), acted] == 1
    return frozenset(table.clips[clear])


def _round_robin_by_emotion(clips: Sequence[str], n: int, rng: np.random.Generator, clear: frozenset) -> list[str]:
    by_emotion: dict[str, list[str]] = {}
    for clip in clips:
        match = _EMOTION_IN_NAME.match(clip)
        by_emotion.setdefault(match.group(1) if match else "", []).append(clip)
    queues = []
    for emotion in sorted(by_emotion):
        members = list(by_emotion[emotion])
        rng.shuffle(members)
        members.sort(key=lambda clip: clip in clear)  # stable: clear clips last, popped first
        queues.append(members)
    rng.shuffle(queues)  # with n < 6, which emotions come first varies with the seed
    picked = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked




# ---------------------------------------------------------------- feature caches


def write_feature_cache(cache_dir, clips: Sequence[str], means: np.ndarray, frames: Sequence[int],
                        fold: int | Sequence[int] | None = None, ln_means: np.ndarray | None = None,
                        name: str = "synthetic", chunk_clips: int = 16) -> Path:
    """A complete cache of ``means [N, L, D]`` (float32, in ``clips`` order) as ``s3prl-stimulus extract`` writes one.

    ``fold``: the cache claims fold ``fold``'s training-clip normalisation (statistics 0 and 1, its training clips'
    fingerprint); several folds: one cache serving each of them, as when the fold-invariance test holds;
    ``None``: no normalisation. ``ln_means``: layer-normalised means, for
    ``--upstream_feature_normalize``. The upstream is named ``name`` with an all-zero weights hash.
    """
    from s3prl_stimulus.audio import clips_fingerprint
    from s3prl_stimulus.cache import extraction, store
    from s3prl_stimulus.cache.manifest import build_manifest
    from s3prl_stimulus.cache.normalisation import Normalisation
    from s3prl_stimulus.partition import split_clips

    cache_dir = Path(cache_dir)
    position = {clip: i for i, clip in enumerate(clips)}
    order, lengths = extraction.sorted_by_length({c: clip_samples(c) for c in clips})
    folds = [] if fold is None else [fold] if isinstance(fold, int) else list(fold)
    norms = [Normalisation("train_mean_std", k, 0.0, 1.0, clips_fingerprint([c for c in split_clips(k, "train")
                                                                              if c in position])) for k in folds]
    upstream = {"name": name, "weights_sha256": "0" * 64, "model_config_sha256": None, "feature_selection": "hidden_states",
                "layer_selection": None, "n_hidden": means.shape[1], "weighted_sum": True, "dim": means.shape[2],
                "downsample_rate": 320}
    manifest = build_manifest(upstream, norms[0] if norms else Normalisation("none"), None, "fp32", ln_means is not None,
                              order, lengths, chunk_clips=chunk_clips, shared_folds=norms if len(norms) > 1 else None)
    extraction.prepare_cache_dir(cache_dir, manifest)
    for i, (a, b) in enumerate(store.chunk_ranges(len(order), chunk_clips)):
        rows = [position[c] for c in order[a:b]]
        arrays = {"clips": np.asarray(order[a:b]), "frames": np.asarray([frames[r] for r in rows]),
                  "means": np.ascontiguousarray(means[rows], dtype=np.float32)}
        if ln_means is not None:
            arrays["ln_means"] = np.ascontiguousarray(ln_means[rows], dtype=np.float32)
        store.write_chunk(store.chunk_path(cache_dir, i), arrays)
    extraction._finish(cache_dir, manifest)
    return cache_dir


__all__ = [
    "make_tiny_wavlm", "make_tiny_hubert", "make_tiny_wav2vec2", "make_corpus", "tiny_clip_subset", "clip_samples",
    "plain_run_downstream_command", "write_feature_cache",
]
