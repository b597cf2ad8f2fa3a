"""The Python client (`Client`), its command line and its pictures."""

from serving.client.cli import format_summary
from serving.client.sdk import (
    DEFAULT_RETRY,
    DEFAULT_TARGET,
    SERVICE_CONFIG,
    Client,
    Explanation,
    Failure,
    FeatureMaps,
    Filters,
    Prediction,
    RetryPolicy,
    predict_request,
    service_config,
)

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TARGET",
    "SERVICE_CONFIG",
    "Client",
    "Explanation",
    "Failure",
    "FeatureMaps",
    "Filters",
    "Prediction",
    "RetryPolicy",
    "format_summary",
    "predict_request",
    "service_config",
]
