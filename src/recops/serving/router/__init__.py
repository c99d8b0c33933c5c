"""The A/B router: sticky user → arm assignment in front of one recommender upstream per arm.

``recops serve router --config router.yaml`` runs :func:`recops.serving.router.app.create_app` on
uvicorn. Modules: ``config`` (the YAML file, loading, the reload watcher), ``schemas`` (request and
response bodies), ``upstream`` (the :class:`~recops.serving.router.upstream.Recommender` protocol and
the in-process ranker), ``metrics`` (Prometheus), ``feedback_log`` (the durable event log: a JSONL
file, or a Kafka topic through ``kafka_sink``), ``runtime`` (config snapshots and their lifecycle),
``openapi`` and ``app`` (HTTP).
"""
