"""Celery apps run by the compatibility suite (``python -m compat``)."""
