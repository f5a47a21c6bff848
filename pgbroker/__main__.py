"""``python -m pgbroker``: the same as the ``pgbroker`` command."""

from pgbroker.cli import main

raise SystemExit(main())
