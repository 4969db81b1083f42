"""Translation between graph formats: PyTorch → ONNX (``onnx_export``), an ONNX file brought from elsewhere made
ready (``onnx_import``), ONNX → TensorFlow with onnx-tf (``onnx_to_tf``, ``compat``, ``layout``), and the node-by-node
divergence finder (``divergence``). The SavedModel and TFLite files are built by :mod:`export`. Pure library code (no
pipelines, no mlflow)."""
