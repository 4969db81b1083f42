"""Training: datasets (EMNIST, digits), the PyTorch model family (MLP, CNN), checkpoints, the seeded training loop and
its distributed ranks under torchrun. Pure library code (no pipelines, no mlflow)."""
