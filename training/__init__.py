"""Training: datasets and the PyTorch model family (MLP, CNN). Pure library code (no pipelines, no mlflow)."""
