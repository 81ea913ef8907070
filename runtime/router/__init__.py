"""The message fabric: msgpack envelopes over ZeroMQ between gateways and partitions."""
