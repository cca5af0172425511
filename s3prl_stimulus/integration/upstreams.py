"""The paper's 15 upstreams as S3PRL 0.4.18 builds them: what each should look like, and where its weights live.

One row per name of ``recipes/upstreams.txt``: S3PRL's hub name, the ``*_local`` entry that loads the same
checkpoint format from a file (``-u LOCAL -k FILE``), the hidden states the featurizer sees (count x width),
S3PRL's downsample rate (input samples per frame: 320 = 50 frames per second), the parameter count, the URL
S3PRL downloads and the checkpoint layout its expert reads. Counts, widths and rates are those of the released
models as S3PRL's experts expose them. Parameter counts (millions, rounded) are S3PRL's own model classes counted
at the released sizes for the wav2vec 2.0 family, HuBERT, data2vec, wav2vec and DeCoAR 2, and SUPERB's published
counts for WavLM and the RNN/CNN/small-transformer models. ``tests/test_upstreams.py`` checks every row against
S3PRL's code: URLs against its hub functions, hidden-state counts and rates against the models it builds (and
DeCoAR 2's parameters, built at full size).

Standard library only: ``s3prl-stimulus doctor`` lists these facts before it imports torch or S3PRL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from s3prl_stimulus.errors import StimulusError

SAMPLE_RATE = 16000
_HF = "https://huggingface.co/s3prl/converted_ckpts/resolve/main/"
_APC = "https://huggingface.co/leo19941227/apc_series/resolve/main/"


@dataclass(frozen=True)
class PaperUpstream:
    name: str
    title: str
    local: Optional[str]
    hidden_states: int
    dim: int
    rate: int
    parameters_m: float
    url: Optional[str]
    layout: str

    @property
    def frames_per_second(self) -> float:
        return SAMPLE_RATE / self.rate

    @property
    def weights_mb(self) -> int:
        """Size of the weights in float32, MB: about what a download of them costs."""
        return round(self.parameters_m * 4)


def _converted(file: str) -> str:
    return _HF + file


PAPER_UPSTREAMS: tuple[PaperUpstream, ...] = (
    PaperUpstream("wavlm_large", "WavLM Large", "wavlm_local", 25, 1024, 320, 316.6, _converted("wavlm_large.pt"),
                  "{'cfg': WavLMConfig dict, 'model': state_dict}"),
    PaperUpstream("xls_r_1b", "XLS-R 1B", "wav2vec2_local", 49, 1280, 320, 965.5, _converted("xlsr2_960m_1000k.pt"),
                  "{'task_cfg', 'model_cfg', 'model_weight'} (converted fairseq)"),
    PaperUpstream("hubert_large_ll60k", "HuBERT Large", "hubert_local", 25, 1024, 320, 316.6,
                  _converted("hubert_large_ll60k.pt"),
                  "{'task_cfg', 'model_cfg', 'model_weight', 'dictionaries_symbols'} (converted fairseq)"),
    PaperUpstream("wav2vec2_large_ll60k", "wav2vec 2.0 Large", "wav2vec2_local", 25, 1024, 320, 317.4,
                  _converted("wav2vec_vox_new.pt"), "{'task_cfg', 'model_cfg', 'model_weight'} (converted fairseq)"),
    PaperUpstream("data2vec_large_ll60k", "data2vec Large", "data2vec_local", 25, 1024, 320, 315.4,
                  _converted("vox_pretrained.pt"),
                  "{'task_cfg', 'model_cfg', 'model_weight'} with '_ema' in model_weight (converted fairseq)"),
    PaperUpstream("decoar2", "DeCoAR 2.0", "decoar2_local", 13, 768, 320, 89.8, _converted("checkpoint_decoar2.pt"),
                  "{'model': state_dict} (architecture fixed in S3PRL's code)"),
    PaperUpstream("wav2vec2_large_lv60_cv_swbd_fsh", "wav2vec 2.0 Robust", "wav2vec2_local", 25, 1024, 320, 317.4,
                  _converted("w2v_large_lv_fsh_swbd_cv.pt"),
                  "{'task_cfg', 'model_cfg', 'model_weight'} (converted fairseq)"),
    PaperUpstream("wav2vec", "wav2vec", "wav2vec_local", 13, 512, 160, 32.8, _converted("wav2vec_large.pt"),
                  "{'task_cfg', 'model_cfg', 'model_weight'} (converted fairseq)"),
    PaperUpstream("apc", "APC", "apc_local", 3, 512, 160, 4.1, _APC + "apc_360hr.ckpt",
                  "{'model', 'config': {data.audio, model.paras}, 'optimizer', 'global_step'}"),
    PaperUpstream("vq_apc", "VQ-APC", "apc_local", 3, 512, 160, 4.6, _APC + "vq_apc_360hr.ckpt",
                  "{'model', 'config': {data.audio, model.paras with vq}, 'optimizer', 'global_step'}"),
    PaperUpstream("tera", "TERA", "tera_local", 4, 768, 160, 21.3,
                  "https://huggingface.co/s3prl/tera/resolve/main/tera_logMelBase_T_F_M_AdamW_b32_1m_960hr_drop1/"
                  "states-1000000.ckpt", "S3PRL pretraining states: Transformer, SpecHead, Upstream_Config, Config, Args, ..."),
    PaperUpstream("mockingjay", "Mockingjay", "mockingjay_local", 13, 768, 160, 85.1,
                  "https://huggingface.co/s3prl/mockingjay/resolve/main/"
                  "mockingjay_logMelLinearLarge_T_AdamW_b32_500k_360hr_drop1/states-500000.ckpt",
                  "S3PRL pretraining states: Transformer, SpecHead, Upstream_Config, Config, Args, ..."),
    PaperUpstream("npc", "NPC", "npc_local", 9, 512, 160, 19.4, _APC + "npc_360hr.ckpt",
                  "{'model', 'config': {data.audio, model.paras}, 'optimizer', 'global_step'}"),
    PaperUpstream("modified_cpc", "Modified CPC", "cpc_local", 2, 256, 160, 1.8,
                  "https://dl.fbaipublicfiles.com/librilight/CPC_checkpoints/60k_epoch4-d0f474de.pt",
                  "{'config': dict, 'weights': state_dict}"),
    PaperUpstream("fbank", "FBANK", None, 1, 240, 160, 0.0, None, "no checkpoint (computed from the waveform)"),
)

_BY_NAME = {upstream.name: upstream for upstream in PAPER_UPSTREAMS}


def paper_upstream(name: str) -> PaperUpstream:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise StimulusError(f"{name!r} is not one of the paper's upstreams: use one of {', '.join(_BY_NAME)}") from None


def download_dir() -> Path:
    """Where S3PRL caches downloads (``s3prl.util.download``'s directory, default ``~/.cache/s3prl/download``),
    without creating it."""
    try:
        from s3prl.util import download
    except ImportError:  # doctor lists the cache before S3PRL is known to import
        return Path.home() / ".cache" / "s3prl" / "download"
    return Path(download._download_dir)


def cached_weights_path(url: str, directory: Optional[Path] = None) -> Path:
    """The file S3PRL downloads ``url`` to and looks for before downloading: ``<sha256(url)>.<basename>``
    in its download directory (``s3prl.util.download._urls_to_filepaths``)."""
    digest = hashlib.sha256(url.encode()).hexdigest()
    return Path(directory if directory is not None else download_dir()) / f"{digest}.{Path(url).name}"
