"""TF Serving warmup requests: a TFRecord of ``PredictionLog`` records on real images.

TF Serving replays ``assets.extra/tf_serving_warmup_requests`` when it loads a version,
so the first real request does not pay for graph initialisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossport.interface import CLASSIFY_KEY, INPUT, PREDICT_KEY, PREDICT_UINT8_KEY

WARMUP_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's own limit on warmup records


def write_warmup(path: Path, model_name: str, images: np.ndarray, batch_sizes: tuple[int, ...] = (1, 8)) -> int:
    """Write predict (float32 and uint8) and classify requests on ``images`` (float32 in [0, 1]); return the record
    count."""
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_log_pb2

    from crossport.runtimes import serialize_examples

    records = []
    for batch_size in batch_sizes:
        batch = np.asarray(images[:batch_size], dtype=np.float32)
        if len(batch) == 0:
            continue
        predict = predict_pb2.PredictRequest()
        predict.model_spec.name = model_name
        predict.model_spec.signature_name = PREDICT_KEY
        predict.inputs[INPUT].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.float32))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=predict)))

        raw = predict_pb2.PredictRequest()  # the same images as 0-255 integers, as a client sending raw pixels
        raw.model_spec.name = model_name
        raw.model_spec.signature_name = PREDICT_UINT8_KEY
        raw.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.round(batch * 255).astype(np.uint8), dtype=tf.uint8))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=raw)))

        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name = model_name
        classify.model_spec.signature_name = CLASSIFY_KEY
        for serialized in serialize_examples(batch):
            classify.input.example_list.examples.add().ParseFromString(serialized)
        records.append(
            prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify))
        )
    records = records[:MAX_RECORDS]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return len(records)
