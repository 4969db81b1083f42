"""``python -m pipelines.serve``: the web service (TF Serving REST routes, upload page), in ``serving.serve``."""

import sys

from serving.serve import main

if __name__ == "__main__":
    sys.exit(main())
