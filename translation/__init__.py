"""Translation: ONNX → TensorFlow → SavedModel and TFLite. Pure library code (no pipelines, no mlflow)."""
