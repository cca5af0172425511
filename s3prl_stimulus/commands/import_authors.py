"""s3prl-stimulus import-authors: the paper authors' released S3PRL ``emo`` checkpoints, as this package's."""

from __future__ import annotations

import argparse

from s3prl_stimulus.io import check_writable_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC",
                        help="one of their dev-best.ckpt files, or the folder holding their "
                             "<upstream>_<corpus>_fold<N>_multimodal folders (walked for dev-best.ckpt)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="checkpoints go to DIR/<name>/<train_stimulus>/fold<k>/seed<s>/dev-best.ckpt "
                             "(seed: their Args.seed), with import.json beside each")
    parser.add_argument("--upstream", metavar="NAME",
                        help="S3PRL upstream the evaluation runs (default: theirs, e.g. wavlm_large, which S3PRL "
                             "downloads; with --upstream-ckpt the entry that reads that file, e.g. wavlm_local)")
    parser.add_argument("--upstream-ckpt", metavar="FILE", help="local weights file for --upstream (S3PRL's -k)")
    parser.add_argument("--name", help="directory under --out (default: their upstream, e.g. wavlm_large)")
    parser.add_argument("--label", help="name of these models in results and the report "
                                        "(default: \"<their upstream> (authors)\")")
    parser.add_argument("--corpus", metavar="DIR", help="CREMA-D AudioWAV folder written into the checkpoints' config "
                                                        "(else pass datarc.audio_dir with -o when evaluating)")
    parser.add_argument("--votes", default="paper", help="votes source of the config (default: paper)")
    parser.add_argument("--clips", default="all", help="datarc.clips of the config: all (default), present (the WAVs "
                                                       "found in --corpus) or a file listing clip names")
    parser.add_argument("--overwrite", action="store_true", help="replace checkpoints imported before from other files "
                                                                 "or with other options")


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    from s3prl_stimulus.study.authors import ImportOptions, import_checkpoints

    options = ImportOptions(args.upstream, args.upstream_ckpt, args.name, args.label, args.corpus, args.votes,
                            args.clips, args.overwrite)
    written = import_checkpoints(args.source, args.out, options)
    for path in written:
        print(path)
    print(f"{len(written)} checkpoint(s) imported under {args.out}; their upstream is unverified (not fingerprinted "
          "by the authors): evaluate with `python -m s3prl_stimulus.run_downstream -m evaluate -e CKPT` or "
          "`s3prl-stimulus sweep --evaluate CKPT`")
    return 0
