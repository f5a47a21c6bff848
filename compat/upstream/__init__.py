"""Celery's and Kombu's own integration suites against pgbroker (runner.py)."""
