"""``python -m memwatch ...`` is the same as the ``memwatch`` command."""

import sys

from memwatch._cli import main

sys.exit(main())
