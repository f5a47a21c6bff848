"""The ``pgbroker`` command (``pgbroker.cli.main:main``).

``main`` builds the parser from one module per command group (``migrate``,
``status``, ``top``, ``purge``, ``dead_letters``, ``tasks``, ``prune``,
``metrics``, ``demo``); what they share is in ``options``.
"""
