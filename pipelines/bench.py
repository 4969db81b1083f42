"""``python -m pipelines.bench``: the benchmark; the code lives in ``pipelines.tools.bench``."""

import sys

from pipelines.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
