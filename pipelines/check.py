"""``python -m pipelines.check``: crossport's gate on a servable any converter made; the code lives in
``pipelines.tools.check``."""

import sys

from pipelines.tools.check import main

if __name__ == "__main__":
    sys.exit(main())
