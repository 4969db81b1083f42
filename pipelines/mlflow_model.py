"""A published version as an MLflow pyfunc model: what the register stage logs and registers.

MLflow copies this file into the logged model ("models from code"), so it imports only what
loading needs (NumPy, TensorFlow, MLflow), never crossport:
``mlflow.pyfunc.load_model("models:/<name>@validated")`` works on any machine with
TensorFlow. The published version directory travels inside the model as the artifact
``servable``, byte for byte, at ``artifacts/<N>/`` (so the model's ``artifacts/`` folder is a
TF Serving model base path with that one version); loading refuses it
when its ``saved_model.pb`` no longer has the sha256 recorded at registration.
``predict`` takes float32 ``images`` [N, *shape] ([N, 784], or [N, H, W, C] for another image size; an array,
or ``{"images": array}``) and returns
``{"scores": [N, C]}`` from the SavedModel's ``serving_default`` signature.
"""

import hashlib
from pathlib import Path

import mlflow
import numpy as np

SERVABLE = "servable"  # the artifact key of the published version directory
SHA256_KEY = "saved_model_sha256"  # the model_config entry loading checks


class PublishedServable(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import tensorflow as tf

        directory = Path(context.artifacts[SERVABLE])
        expected = (context.model_config or {}).get(SHA256_KEY)
        found = hashlib.sha256((directory / "saved_model.pb").read_bytes()).hexdigest()
        if expected and found != expected:
            raise ValueError(f"{directory}/saved_model.pb has sha256 {found}, but {expected} was registered: "
                             "the servable in this model changed after registration; re-register it")
        self._signature = tf.saved_model.load(str(directory)).signatures["serving_default"]

    # the hint is one MLflow infers no schema from: the logged signature (images [N, *shape]) validates the input,
    # which arrives as that array or as {"images": array}
    def predict(self, context, model_input: np.ndarray, params=None) -> dict:
        import tensorflow as tf

        images = model_input["images"] if isinstance(model_input, dict) else model_input
        images = np.asarray(images, dtype=np.float32)
        return {"scores": self._signature(images=tf.constant(images))["scores"].numpy()}


mlflow.models.set_model(PublishedServable())
