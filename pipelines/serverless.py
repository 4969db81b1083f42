"""``python -m pipelines.serverless``: a Lambda package of one published version (code: ``serving.serverless``)."""

import sys

from serving.serverless import main

if __name__ == "__main__":
    sys.exit(main())
