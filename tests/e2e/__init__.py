"""End-to-end tests: the official durabletask SDK against a running runtime."""
