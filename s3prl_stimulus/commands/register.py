"""s3prl-stimulus register: link the emotion_stimulus downstream into an S3PRL checkout or install."""

from s3prl_stimulus.integration.registration import register

_MESSAGES = {
    "created": "registered: {link} -> {source}",
    "replaced": "registered (replaced a link to another installation): {link} -> {source}",
    "unchanged": "already registered: {link} -> {source}",
}


def add_arguments(parser):
    parser.add_argument(
        "--s3prl", metavar="DIR", default=None,
        help="S3PRL's package folder (the one holding downstream/) or an S3PRL checkout's root "
             "(default: the s3prl package installed in this environment)",
    )


def run(args) -> int:
    result = register(args.s3prl)
    print(_MESSAGES[result.action].format(link=result.link, source=result.source))
    return 0
