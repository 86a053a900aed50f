"""``python -m selfsight`` (and ``torchrun -m selfsight``) runs the command line."""

import sys

from selfsight.cli import main

sys.exit(main())
