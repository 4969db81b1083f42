"""crossport: PyTorch → ONNX → TensorFlow servables, parity-checked at every hop.

This package is the shared kernel every other package may import: the exception
hierarchy, file hashing and the parity module. It imports nothing heavy.
"""

__version__ = "0.1.0"

from crossport.frameworks import keep_triton_away_from_tensorflow

keep_triton_away_from_tensorflow()  # in every process that imports crossport
