"""``python -m export.serverless``: the earlier name of ``python -m pipelines.serverless``, kept so that deploy
scripts written against it keep working. The builder lives in ``serving.serverless``; this module only forwards the
command (``runpy``), so the building code below it never depends on the serving code."""

import runpy

if __name__ == "__main__":
    runpy.run_module("serving.serverless", run_name="__main__", alter_sys=True)
