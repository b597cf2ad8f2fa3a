"""The HTTP protocol: KServe v2 REST, our /v1 routes and the page, over the data plane."""
