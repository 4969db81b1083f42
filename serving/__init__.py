"""Serving what :mod:`export` published: TF Serving's REST and gRPC APIs and the upload page (``serve``, ``rest``,
``grpc_service``, ``workers``), and the serverless route (``serverless`` builds a Lambda package, whose handler is
``serverless_handler``). Pure library code (no pipelines, no mlflow); the commands are ``python -m pipelines.serve``
and ``python -m pipelines.serverless``."""
