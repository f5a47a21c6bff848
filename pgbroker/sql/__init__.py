"""Every SQL statement pgbroker runs, as named blocks (``-- name: ...``) in one
``.sql`` file per component; :mod:`pgbroker.database.queries` loads them."""
