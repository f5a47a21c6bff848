"""The Kombu transport: channels and declarations, the consumer session and
its event loop, delayed delivery, routing, crash recovery (the sweeper),
and transactional enqueue."""
