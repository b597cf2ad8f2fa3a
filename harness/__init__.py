"""What tests, benchmarks and scripts share: the real server as a subprocess, free ports, real
models, /metrics scrapes, and the hostile-traffic generators (`python -m harness.fuzz`,
`python -m harness.soak`). Installed with the project, so every caller imports it plainly.
"""

from harness.models import (
    PYTHON,
    ROOT,
    copy_repository,
    train_model,
    write_tiny_cnn,
    write_tiny_model,
)
from harness.ports import free_port
from harness.scrape import Scrape, scrape
from harness.server import ServerProcess, serve_newest

__all__ = [
    "PYTHON",
    "ROOT",
    "Scrape",
    "ServerProcess",
    "copy_repository",
    "free_port",
    "scrape",
    "serve_newest",
    "train_model",
    "write_tiny_cnn",
    "write_tiny_model",
]
