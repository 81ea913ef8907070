"""Protocol definition and generated gRPC/protobuf code for the Durable Task sidecar."""
