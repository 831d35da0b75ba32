"""``python -m jaxsloth``: the same command as the ``jaxsloth`` console script."""

import sys

from jaxsloth.cli import main

sys.exit(main())
