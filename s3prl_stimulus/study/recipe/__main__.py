"""``python -m s3prl_stimulus.study.recipe train|evaluate|status|preflight|task ...``"""

import sys

from s3prl_stimulus.study.recipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
