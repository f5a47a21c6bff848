"""The Celery result backend: stored results, the result consumer that waits
on them with LISTEN, groups and chords."""
