"""The gRPC protocols: our cnnserve.v1 API and the Open Inference Protocol, over the data plane."""
