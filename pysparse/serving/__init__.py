"""Serving: continuous batching of many requests on one compiled decoder (engine: the scheduler
and its KV-cache slots, framework-free), the OpenAI-compatible HTTP server on it (app), and its
Prometheus metrics (metrics). ``pysparse serve DIR`` runs it.

May import: runtime, kernels, util. Never the passes, artifacts or the CLI.
"""
