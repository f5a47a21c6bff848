"""``python -m pgbroker``: the same as the ``pgbroker`` command."""

from pgbroker.cli.main import main

raise SystemExit(main())
