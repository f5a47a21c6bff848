from kombu import Connection, Consumer, Exchange, Producer, Queue


def test_publish_and_consume_in_priority_order(db_url: str) -> None:
    with Connection(db_url) as conn:
        exchange = Exchange("tasks", type="direct")
        queue = Queue("q1", exchange, routing_key="k")
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel, exchange=exchange)
        for i in range(5):
            producer.publish({"i": i}, routing_key="k", priority=i % 3)
        got = []

        def on_message(body, message):
            got.append(body["i"])
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            while len(got) < 5:
                conn.drain_events(timeout=5)
        assert got == [2, 1, 4, 0, 3]
