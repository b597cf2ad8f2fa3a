"""cnnserve's gRPC inference server for image CNNs exported to ONNX."""
