import sys

from s3prl_stimulus.cli import main

sys.exit(main())
