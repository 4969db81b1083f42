"""Training: datasets and the PyTorch MLP. Pure library code (no pipelines, no mlflow)."""
