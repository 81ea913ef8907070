"""The gRPC gateway: serves TaskHubSidecarService and turns requests into partition commands."""
