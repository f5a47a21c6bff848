"""Running pgbroker: admin queries, retention, metrics and the beat
scheduler."""
