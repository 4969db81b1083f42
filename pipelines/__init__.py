"""The pipeline: the command line, the stage table (``stages``), the runner and run-directory lock, manifests, the
run config and the parity gate's policy (``gate``), publishing, tracking, and the commands' entry points
(``python -m pipelines.<command>``)."""
