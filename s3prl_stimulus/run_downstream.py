"""``python -m s3prl_stimulus.run_downstream <S3PRL run_downstream arguments>``.

The command's home; the launcher itself is :mod:`s3prl_stimulus.integration.launcher`.
"""

import sys

from s3prl_stimulus.integration.launcher import main

if __name__ == "__main__":
    sys.exit(main())
