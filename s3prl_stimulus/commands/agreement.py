"""s3prl-stimulus agreement: Table II, class-averaged CCC between the four label sets."""

from s3prl_stimulus.agreement import agreement_matrix
from s3prl_stimulus.commands.common import add_format_argument, add_votes_arguments, votes_from_args
from s3prl_stimulus.tables import render


def add_arguments(parser):
    add_votes_arguments(parser)
    add_format_argument(parser)


def run(args) -> int:
    matrix = agreement_matrix(votes_from_args(args))
    json_obj = {a: {b: float(matrix.loc[a, b]) for b in matrix.columns} for a in matrix.index}
    print(render(matrix, args.format, json_obj=json_obj))
    return 0
