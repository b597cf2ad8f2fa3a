"""The protocol-free core: one data plane over admission, batching, the runtime and the repository."""
