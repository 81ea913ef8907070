"""durable-runtime: the gateway, router and supervisor around the partition processes."""
