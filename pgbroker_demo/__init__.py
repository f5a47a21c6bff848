"""``pgbroker demo``: a chain of durable tasks, a worker killed mid-run, and
the chain finishing on another worker. Installed with pgbroker, outside
the library: the library never imports it."""
