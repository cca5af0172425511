"""s3prl-stimulus unregister: remove the link made by `s3prl-stimulus register`."""

from s3prl_stimulus.commands.register import add_arguments  # same --s3prl option
from s3prl_stimulus.integration.registration import unregister

__all__ = ["add_arguments", "run"]


def run(args) -> int:
    result = unregister(args.s3prl)
    if result.action == "removed":
        print(f"unregistered: removed {result.link} (-> {result.source})")
    else:
        print(f"not registered: {result.link} does not exist")
    return 0
