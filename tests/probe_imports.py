"""``python -m tests.probe_imports MODULE``: import MODULE, build its parser, print which frameworks got loaded."""

import sys
from importlib import import_module

if __name__ == "__main__":
    import_module(sys.argv[1]).build_parser()
    print(sorted(m for m in ("torch", "tensorflow", "mlflow", "onnxruntime") if m in sys.modules))
