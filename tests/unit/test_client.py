"""serving.client: README's service config for other clients is the one our client uses."""

from __future__ import annotations

import json
import re

from harness import ROOT
from serving.client import SERVICE_CONFIG


def test_readme_shows_the_clients_service_config() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Retries and load balancing") :]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None
    assert json.loads(block.group(1)) == json.loads(SERVICE_CONFIG)
