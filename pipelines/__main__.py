import sys

from pipelines.run import main

sys.exit(main())
