"""Tools around the pipeline: the benchmark, lineage tracing and the divergence finder's command."""
