"""Tiny random-weight checkpoints of the paper's 14 self-supervised upstreams, in the formats S3PRL loads.

:func:`make_paper_checkpoint` writes, for a hub name of :data:`s3prl_stimulus.integration.upstreams.PAPER_UPSTREAMS`,
a file that S3PRL 0.4.18's own expert for that model reads: the same layout and config keys as the released
file (``integration/upstreams.py`` lists each layout), built with S3PRL's own model classes. Layer counts stay
those of the released model, so the featurizer sees as many hidden states and the same frame rate; only widths
shrink (:func:`tiny_dim`), except where S3PRL's code fixes the architecture (DeCoAR 2). Each file is well under
1 MB and takes well under a second to build, except DeCoAR 2 (S3PRL builds its full 90 M-parameter model).

The same file loads by hub name when it sits where S3PRL's download cache looks for the released URL
(:func:`s3prl_stimulus.integration.upstreams.cached_weights_path`), and through the ``*_local`` entry with ``-k``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
from pathlib import Path

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS, paper_upstream
from s3prl_stimulus.testing import CONV_STRIDE_LAYERS, _save_checkpoint, _seeded_model

WIDTH = 16
"""Hidden width of every shrunk model (the released ones: 256 to 1280)."""
CONV_CHANNELS = 32
"""Width of the wav2vec 2.0 / HuBERT / WavLM convolutional front end (released: 512), stride kept (320x)."""
MEL_BINS = 80
"""Log-mel input of APC, VQ-APC, NPC, TERA and Mockingjay, as released."""


RELEASED_WIDTH = frozenset({"decoar2", "fbank"})
"""Upstreams whose width S3PRL's code fixes: their tiny version is as wide as the released one."""


def tiny_dim(name: str) -> int:
    """Width of the hidden states of ``name``'s tiny checkpoint."""
    return paper_upstream(name).dim if name in RELEASED_WIDTH else WIDTH


def make_paper_checkpoint(name: str, path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of paper upstream ``name`` (an S3PRL hub name) to ``path``."""
    builders = _BUILDERS
    if name not in builders:
        known = ", ".join(u.name for u in PAPER_UPSTREAMS if u.name in builders)
        raise StimulusError(f"no tiny checkpoint for {name!r}: use one of {known} (fbank needs none)")
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    return builders[name](Path(path), seed)


# ---------------------------------------------------------------- wav2vec 2.0 family


def _large_encoder(layers: int) -> dict:
    """A Large model's transformer (pre-LN, layer-norm front end with conv bias), shrunk in width only."""
    return {
        "extractor_mode": "layer_norm", "encoder_layers": layers, "encoder_embed_dim": WIDTH,
        "encoder_ffn_embed_dim": 2 * WIDTH, "encoder_attention_heads": 2, "layer_norm_first": True,
        "conv_feature_layers": CONV_STRIDE_LAYERS.format(c=CONV_CHANNELS), "conv_bias": True,
        "conv_pos": 16, "conv_pos_groups": 2,
    }


def _fairseq_cfg(name: str, config) -> dict:
    """A fairseq dataclass config as S3PRL's converter stores it: every field, plus fairseq's ``_name``."""
    return {"_name": name, **dataclasses.asdict(config)}


def _audio_task(normalize: bool) -> dict:
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig

    return _fairseq_cfg("audio_pretraining", AudioPretrainingConfig(sample_rate=16000, normalize=normalize))


def _wavlm(path: Path, seed: int) -> Path:
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    overrides = {**_large_encoder(24), "normalize": True, "relative_position_embedding": True, "num_buckets": 32,
                 "max_distance": 128, "gru_rel_pos": True}
    cfg = vars(WavLMConfig(overrides)).copy()
    model = _seeded_model(seed, lambda: WavLM(WavLMConfig(cfg)))
    return _save_gpu_tagged(path, {"cfg": cfg, "model": model.state_dict()})


def _wav2vec2(layers: int):
    def build(path: Path, seed: int) -> Path:
        from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

        config = Wav2Vec2Config(**_large_encoder(layers), final_dim=WIDTH, quantize_targets=True, latent_vars=8,
                                latent_groups=2)
        model = _seeded_model(seed, lambda: Wav2Vec2Model(config))
        return _save_checkpoint(path, {"task_cfg": _audio_task(normalize=True),
                                       "model_cfg": _fairseq_cfg("wav2vec2", config), "model_weight": model.state_dict()})

    return build


def _hubert(path: Path, seed: int) -> Path:
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    config = HubertConfig(label_rate=50.0, **_large_encoder(24), final_dim=WIDTH)
    task = HubertPretrainingConfig(label_rate=50.0, sample_rate=16000, normalize=True)
    symbols = [["<s>", "<pad>", "</s>", "<unk>", *map(str, range(8))]]  # a fairseq Dictionary of k-means units
    model = _seeded_model(seed, lambda: HubertModel(config, task, symbols))
    return _save_checkpoint(path, {"task_cfg": _fairseq_cfg("hubert_pretraining", task),
                                   "model_cfg": _fairseq_cfg("hubert", config), "model_weight": model.state_dict(),
                                   "dictionaries_symbols": symbols})


def _data2vec(path: Path, seed: int) -> Path:
    from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig, Data2VecAudioModel

    config = Data2VecAudioConfig(**_large_encoder(24))

    def build():
        model = Data2VecAudioModel(config)
        model.remove_pretraining_modules()
        return model

    weights = _seeded_model(seed, build).state_dict()
    # fairseq stores the teacher's (EMA) encoder next to the weights; S3PRL deletes it before loading
    weights["_ema"] = {name: tensor.clone() for name, tensor in weights.items() if name.startswith("encoder.")}
    return _save_checkpoint(path, {"task_cfg": _audio_task(normalize=True),
                                   "model_cfg": _fairseq_cfg("data2vec_audio", config), "model_weight": weights})


# ---------------------------------------------------------------- convolutional / fixed architectures


def _wav2vec(path: Path, seed: int) -> Path:
    from s3prl.upstream.wav2vec.wav2vec_model import Wav2VecConfig, Wav2VecModel

    released = Wav2VecConfig(infonce=False)  # S3PRL's defaults are wav2vec Large's layers
    config = dataclasses.replace(released, conv_feature_layers=_narrow(released.conv_feature_layers),
                                 conv_aggregator_layers=_narrow(released.conv_aggregator_layers))
    model = _seeded_model(seed, lambda: Wav2VecModel(config))
    return _save_checkpoint(path, {"task_cfg": _audio_task(normalize=False),
                                   "model_cfg": _fairseq_cfg("wav2vec", config), "model_weight": model.state_dict()})


def _narrow(layers: str) -> str:
    """``[(512, k, s), ...]`` with the tiny width instead of 512, kernels and strides kept."""
    return layers.replace("(512,", f"({WIDTH},")


def _decoar2(path: Path, seed: int) -> Path:
    from s3prl.upstream.decoar2.decoar2 import Decoar2

    weights = _seeded_model(seed, Decoar2).state_dict()
    # S3PRL builds DeCoAR 2 at its released size and loads with strict=False: the input projection and every
    # layer norm are enough to prove the format, and keep the file small (the full weights are 360 MB).
    kept = {name: tensor for name, tensor in weights.items() if name.startswith("post_extract_proj.") or "layer_norm" in name}
    return _save_gpu_tagged(path, {"model": kept})


def _modified_cpc(path: Path, seed: int) -> Path:
    from s3prl.upstream.cpc.cpc_default_config import get_default_cpc_config
    from s3prl.upstream.cpc.feature_loader import getAR, getEncoder
    from s3prl.upstream.cpc.model import CPCModel

    config = vars(get_default_cpc_config())
    config.update(hiddenEncoder=WIDTH, hiddenGar=WIDTH)
    args = argparse.Namespace(**config)
    model = _seeded_model(seed, lambda: CPCModel(getEncoder(args), getAR(args)))
    return _save_checkpoint(path, {"config": config, "weights": model.state_dict()})


# ---------------------------------------------------------------- APC / VQ-APC / NPC


def _log_mel() -> dict:
    return {"feat_type": "fbank", "feat_dim": MEL_BINS, "decode_wav": False, "cmvn": True}


def _apc_family(model_class: str, paras: dict):
    def build(path: Path, seed: int) -> Path:
        import torch

        if model_class == "APC":
            from s3prl.upstream.apc.apc import APC as Model
        else:
            from s3prl.upstream.npc.npc import NPC as Model
        model = _seeded_model(seed, lambda: Model(MEL_BINS, **paras))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        config = {"data": {"audio": _log_mel()}, "model": {"paras": paras}}
        return _save_checkpoint(path, {"model": model.state_dict(), "config": config,
                                       "optimizer": optimizer.state_dict(), "global_step": 1000})

    return build


_APC_PARAS = {"num_layers": 3, "hidden_size": WIDTH, "dropout": 0.1, "residual": True}
_VQ_APC_PARAS = {**_APC_PARAS, "vq": {"codebook_size": [16], "code_dim": [WIDTH], "gumbel_temperature": 0.5}}
_NPC_PARAS = {"hidden_size": WIDTH, "n_blocks": 4, "dropout": 0.1, "residual": True, "kernel_size": 15, "mask_size": 5,
              "vq": {"codebook_size": [8] * 4, "code_dim": [WIDTH // 4] * 4, "gumbel_temperature": 1.0},
              "batch_norm": True, "activate": "relu", "disable_cross_layer": False, "dim_bottleneck": None}


# ---------------------------------------------------------------- TERA / Mockingjay


def _mockingjay_family(layers: int, target: str, legacy: bool):
    """S3PRL's pretraining states. ``legacy``: the upstream config under ``Config`` (older runs, e.g. the
    released Mockingjay), else under ``Upstream_Config`` with the runner's config under ``Config``."""

    def build(path: Path, seed: int) -> Path:
        import torch
        from s3prl.upstream.baseline.preprocessor import get_preprocessor
        from s3prl.upstream.mockingjay.model import TransformerConfig, TransformerModel, TransformerSpecPredictionHead

        upstream_config = _transformer_config(layers, target)
        # get_preprocessor edits the dict it is given
        _, input_dim, target_dim = get_preprocessor(copy.deepcopy(upstream_config["audio"]), process_input_only=True)
        config = TransformerConfig(upstream_config["transformer"])
        transformer = _seeded_model(seed, lambda: TransformerModel(config, input_dim))
        head = _seeded_model(seed + 1, lambda: TransformerSpecPredictionHead(config, target_dim))
        optimizer = torch.optim.AdamW([*transformer.parameters(), *head.parameters()], lr=2e-4)
        runner = {"runner": {"total_steps": 1000000, "gradient_clipping": 5.0, "save_step": 10000},
                  "optimizer": {"name": "AdamW", "lr": 2e-4}}
        states = {"SpecHead": head.state_dict(), "Transformer": transformer.state_dict(),
                  "Optimizer": optimizer.state_dict(), "Step": 1000000,
                  "Args": argparse.Namespace(upstream="mockingjay" if legacy else "tera", seed=1337),
                  "Config": {**runner, **upstream_config} if legacy else runner}
        if not legacy:
            states["Upstream_Config"] = upstream_config
        return _save_checkpoint(path, states)

    return build


def _transformer_config(layers: int, target: str) -> dict:
    transformer = {"hidden_size": WIDTH, "num_hidden_layers": layers, "num_attention_heads": 2, "hidden_act": "gelu",
                   "intermediate_size": 2 * WIDTH, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                   "initializer_range": 0.02, "layer_norm_eps": 1e-12, "share_layer": False, "pre_layer_norm": False}
    feature = {"channel": 0, "log": True, "delta": 0, "cmvn": True}
    audio = {"target_level": -25, "win_ms": 25, "hop_ms": 10, "n_freq": 201, "n_mels": MEL_BINS, "n_mfcc": 13,
             "input": {"feat_type": "mel", **feature},
             "target": {"feat_type": target, **feature, "channel": 1, "log": target == "mel"}}
    return {"transformer": transformer, "task": {"loss": "L1", "sequence_length": 1500}, "audio": audio}


# ---------------------------------------------------------------- saving


def _save_gpu_tagged(path: Path, payload: dict) -> Path:
    """Save as if from a GPU, as the released WavLM and DeCoAR 2 files are: every tensor's storage is tagged
    ``cuda:0``, so a load without ``map_location`` fails where torch sees no CUDA."""
    with _location_tag("cuda:0"):
        return _save_checkpoint(path, payload)


@contextlib.contextmanager
def _location_tag(tag: str):
    import torch.serialization

    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: tag
    try:
        yield
    finally:
        torch.serialization.location_tag = original


_BUILDERS = {
    "wavlm_large": _wavlm,
    "xls_r_1b": _wav2vec2(48),
    "hubert_large_ll60k": _hubert,
    "wav2vec2_large_ll60k": _wav2vec2(24),
    "data2vec_large_ll60k": _data2vec,
    "decoar2": _decoar2,
    "wav2vec2_large_lv60_cv_swbd_fsh": _wav2vec2(24),
    "wav2vec": _wav2vec,
    "apc": _apc_family("APC", _APC_PARAS),
    "vq_apc": _apc_family("APC", _VQ_APC_PARAS),
    "tera": _mockingjay_family(3, "mel", legacy=False),
    "mockingjay": _mockingjay_family(12, "linear", legacy=True),
    "npc": _apc_family("NPC", _NPC_PARAS),
    "modified_cpc": _modified_cpc,
}

__all__ = ["make_paper_checkpoint", "tiny_dim", "WIDTH"]
