"""``python -m bench``: the per-mechanism scenarios (``bench/run.py``)."""

import sys

from bench.run import main

sys.exit(main())
