"""``python -m vitkit`` (and ``torchrun ... -m vitkit train``) runs the ``vitkit`` command."""

import sys

from vitkit.cli import main

sys.exit(main())
