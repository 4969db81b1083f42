"""The pipeline: stages, run manifests, validation, publishing and tracking."""
