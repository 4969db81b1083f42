"""Export: building and publishing servables from a translated graph: the SavedModel with TF Serving's signatures
(``servable``), the TFLite variants (``tflite``), warmup records, the model card, the versioned layout and its atomic
publish, and the offline TF Serving contract check. Serving them is :mod:`serving`. Pure library code (no pipelines,
no mlflow)."""
