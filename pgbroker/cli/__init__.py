"""The ``pgbroker`` command (``pgbroker.cli.main:main``)."""
