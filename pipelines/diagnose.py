"""``python -m pipelines.diagnose``: the divergence finder's command; the code lives in ``pipelines.tools.diagnose``."""

import sys

from pipelines.tools.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
