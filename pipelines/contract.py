"""``python -m pipelines.contract``: the offline TF Serving contract check; the code lives in ``export.contract``."""

import sys

from export.contract import main

if __name__ == "__main__":
    sys.exit(main())
