"""``python -m pipelines.serve``: the web service (TF Serving REST routes, upload page), in ``export.serve``."""

import sys

from export.serve import main

if __name__ == "__main__":
    sys.exit(main())
