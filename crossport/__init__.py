"""crossport: PyTorch → ONNX → TensorFlow servables, parity-checked at every hop.

This package is the shared kernel every other package may import: the exception
hierarchy, file hashing and the parity module. It imports nothing heavy.
"""

__version__ = "0.1.0"
