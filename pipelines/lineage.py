"""``python -m pipelines.lineage``: lineage tracing; the code lives in ``pipelines.tools.lineage``."""

import sys

from pipelines.tools.lineage import main

if __name__ == "__main__":
    sys.exit(main())
