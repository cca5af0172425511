"""Feature cache: encode every clip once with a frozen upstream, keep what the paper's head needs, train the grid from it.

Why a cache is exact. The upstream is frozen, and the paper's head is linear after S3PRL's featurizer:
``logits = W2 · mean_t(W1 · Σ_l a_l · h_l[t] + b1) + b2`` with ``a = softmax(featurizer.weights)``
(``h_l`` optionally layer-normalised per frame when ``upstream_feature_normalize`` is set). The mean
over frames commutes with every linear map, so ``logits = W2 · (W1 · Σ_l a_l · m_l + b1) + b2`` where
``m_l = mean_t h_l[t]`` is taken over exactly the frames S3PRL keeps for the clip
(``Featurizer.tolist``: ``round(samples / downsample_rate)``). Per clip and hidden state that mean is a
sufficient statistic for the forward pass *and* for every gradient of the head and the layer weights,
so training from the cache follows the same trajectory as training through S3PRL.

Extraction (``s3prl-stimulus extract``):

- :mod:`.normalisation`: the waveform preprocessing ``datarc`` names: per-fold training mean/std, crop.
- :mod:`.invariance`: whether the upstream's means are the same under every fold's normalisation, measured on a
  sample of clips (then one cache serves every fold).
- :mod:`.manifest`: the cache key: key fields, their SHA-256, building, reading and comparing manifests.
- :mod:`.store`: a cache directory on disk: checksummed chunks, completion marker, loading (FeatureCache).
- :mod:`.upstream`: the frozen upstream: built through S3PRL's hub, weight hash, per-clip means of a batch.
- :mod:`.extraction`: the ``extract`` driver: clip selection, equal-length batches, streamed encoding, resume.

Training from caches (``s3prl-stimulus sweep``):

- :mod:`.sweep_config`: the S3PRL path's config.yaml, and the checks that stacked runs can reproduce it.
- :mod:`.head`: the paper's head for R runs stacked on a leading axis, its initial state, checkpoint names.
- :mod:`.grid`: caches per fold, each fold's clips and labels, the runs, training batches, the stacked grid.
- :mod:`.step`: the grouped training step's loss and gradients for every run at once, written out by hand.
- :mod:`.kernels`: the step's and the evaluation's CPU kernels (numba): batches read from the table, fused AdamW.
- :mod:`.training`: the runner's training loop and the expert's dev/test evaluation, all runs at once.
- :mod:`.sweep_outputs`: per-run result files, checkpoints and layer weights; summaries; reading checkpoints.
- :mod:`.resume`: the training state saved at evaluation steps (a killed sweep resumes), finished runs kept.
- :mod:`.sweeping`: the ``sweep`` and ``evaluate_checkpoint`` drivers.
"""

from s3prl_stimulus.cache.extraction import extract
from s3prl_stimulus.cache.store import FeatureCache, load_cache
from s3prl_stimulus.cache.sweeping import evaluate_checkpoint, sweep
from s3prl_stimulus.cache.upstream import UpstreamSpec

__all__ = ["FeatureCache", "UpstreamSpec", "evaluate_checkpoint", "extract", "load_cache", "sweep"]
