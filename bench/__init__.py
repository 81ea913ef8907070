"""Benchmark harness for durable-runtime (see bench/README.md)."""
