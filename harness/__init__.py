"""What tests, benchmarks and scripts share: the real server as a subprocess, free ports, real
models, /metrics scrapes, and the hostile-traffic generators (`python -m harness.fuzz`,
`python -m harness.soak`). Installed with the project, so every caller imports it plainly.
"""

from harness.models import (
    PYTHON,
    ROOT,
    NoModel,
    copy_repository,
    newest_version,
    one_model_repository,
    pick_model,
    train_model,
    write_tiny_cnn,
    write_tiny_model,
)
from harness.ports import free_port
from harness.process import Child, ProcessFailed, ServerProcess, serve_newest
from harness.scrape import Scrape, scrape

__all__ = [
    "PYTHON",
    "ROOT",
    "Child",
    "NoModel",
    "ProcessFailed",
    "Scrape",
    "ServerProcess",
    "copy_repository",
    "free_port",
    "newest_version",
    "one_model_repository",
    "pick_model",
    "scrape",
    "serve_newest",
    "train_model",
    "write_tiny_cnn",
    "write_tiny_model",
]
