"""Export: PyTorch checkpoint → ONNX. Pure library code (no pipelines, no mlflow)."""
