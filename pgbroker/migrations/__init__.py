"""The schema, one numbered file per version (``NNN_name.sql``), applied in order
by :mod:`pgbroker.database.schema`."""
