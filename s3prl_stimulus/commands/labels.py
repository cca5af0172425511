"""s3prl-stimulus labels: write label files per stimulus and fold."""

from s3prl_stimulus import STIMULI
from s3prl_stimulus.commands.common import add_votes_arguments, votes_from_args
from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.label_files import LAYOUTS, write_label_files
from s3prl_stimulus.labels import DEFAULT_SMOOTHING, check_smoothing
from s3prl_stimulus.partition import FOLDS, check_fold


def add_arguments(parser):
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the label files to")
    add_votes_arguments(parser)
    parser.add_argument("--layout", choices=LAYOUTS, default="emo-superb",
                        help="emo-superb: labels_<stimulus>_fold<k>.csv; authors: labels_consensus_<1..20>.csv")
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                        help="uniform smoothing s: target = (1-6s)p + s (default 0.01, the paper's; 0 = none)")
    parser.add_argument("--stimuli", nargs="+", choices=STIMULI, default=list(STIMULI))
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), metavar="K")


def run(args) -> int:
    check_writable_dir(args.out, "--out")
    smoothing = check_smoothing(args.smoothing)
    folds = [check_fold(k) for k in args.folds]
    written = write_label_files(args.out, votes_from_args(args), args.stimuli, folds, args.layout, smoothing)
    print(f"wrote {len(written)} label files to {args.out} (votes: {args.votes}, layout: {args.layout}, smoothing: {smoothing})")
    return 0
