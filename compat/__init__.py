"""Comparisons of pgbroker with Redis and RabbitMQ: ``python -m compat.bench``."""
