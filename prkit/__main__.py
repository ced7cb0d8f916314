"""``python -m prkit`` is the ``prkit`` command."""

import sys

from .cli import main

sys.exit(main())
