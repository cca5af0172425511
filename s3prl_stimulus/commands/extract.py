"""s3prl-stimulus extract: encode every clip once with a frozen upstream into a feature cache."""

from __future__ import annotations

import argparse

from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.partition import FOLDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, metavar="DIR", help="CREMA-D's AudioWAV directory")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="cache root: caches go to DIR/<upstream>/fold<k> (or DIR/<upstream>/none)")
    upstream = parser.add_argument_group("upstream (as run_downstream.py spells it)")
    upstream.add_argument("-u", "--upstream", required=True, help="S3PRL hub name, e.g. fbank, wavlm_large, wavlm_local")
    upstream.add_argument("-k", "--upstream_ckpt", metavar="PATH", help="checkpoint for *_local / *_url upstreams")
    upstream.add_argument("-g", "--upstream_model_config", metavar="PATH", help="model config file (e.g. for fbank)")
    upstream.add_argument("-s", "--upstream_feature_selection", default="hidden_states", help="feature key (default hidden_states)")
    upstream.add_argument("-l", "--upstream_layer_selection", type=int, help="keep one hidden state instead of the weighted sum")
    upstream.add_argument("-r", "--upstream_refresh", action="store_true", help="re-download hub checkpoints")
    upstream.add_argument("--upstream_feature_normalize", action="store_true",
                          help="also store the layer-normalised means the featurizer's normalize option needs")
    parser.add_argument("--name", help="directory name for this upstream under --out (default: the -u name)")
    parser.add_argument("--normalisation", choices=("train_mean_std", "none"), default="train_mean_std",
                        help="waveform normalisation as datarc.normalisation (default train_mean_std: the folds' training "
                             "statistics; one cache per fold unless the upstream is invariant to them, see --per-fold)")
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), metavar="K",
                        help="folds whose training mean/std to normalise with (default: 1 2 3 4 5)")
    parser.add_argument("--per-fold", action="store_true",
                        help="one cache per fold even when the upstream is measured to be invariant to the fold "
                             "normalisation (default: test it on a sample of clips and, if it holds, encode once "
                             "for every fold)")
    parser.add_argument("--clips", default="all", metavar="all|present|FILE",
                        help="clips to encode, as datarc.clips (default all: every CREMA-D clip must be present)")
    parser.add_argument("--max-seconds", default="config", metavar="S",
                        help="crop as datarc.max_seconds (default: the packaged config's value; 'none' for no crop)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="upstream precision (means stored in float32)")
    parser.add_argument("--batch-clips", type=int, default=32, help="most clips per forward pass (only equal lengths share one)")
    parser.add_argument("--chunk-clips", type=int, default=256, help="clips per cache chunk (the unit of resuming)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    from s3prl_stimulus.cache.extraction import extract
    from s3prl_stimulus.cache.store import describe_cache
    from s3prl_stimulus.cache.upstream import UpstreamSpec

    spec = UpstreamSpec(args.upstream, args.upstream_ckpt, args.upstream_model_config, args.upstream_feature_selection,
                        args.upstream_layer_selection, args.upstream_refresh)
    max_seconds = _max_seconds(args.max_seconds)
    written = extract(args.corpus, args.out, spec, normalisation=args.normalisation, folds=args.folds, clips=args.clips,
                      device=args.device, dtype=args.dtype, feature_normalize=args.upstream_feature_normalize,
                      max_seconds=max_seconds, name=args.name,
                      chunk_clips=args.chunk_clips, batch_clips=args.batch_clips, progress=not args.no_progress,
                      per_fold=args.per_fold)
    for path in written:
        print(describe_cache(path))
    return 0


def _max_seconds(text: str):
    from s3prl_stimulus.errors import StimulusError

    if text == "config":
        return text
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise StimulusError(f"--max-seconds {text!r}: give seconds (e.g. 10), 'none' or 'config'") from None
