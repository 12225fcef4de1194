"""``python -m mcdrop``: the same as the ``mcdrop`` command."""

import sys

from mcdrop.cli import main

sys.exit(main())
