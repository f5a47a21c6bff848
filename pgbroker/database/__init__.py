"""PostgreSQL itself: sessions and their settings, connection pools, fork
safety, the schema and its migrations, the SQL loader, the embedded server."""
