"""The server's /metrics as data: one scrape, then sums and lookups by name and labels."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(
            tuple(s for family in text_string_to_metric_families(text) for s in family.samples)
        )

    def matching(self, name: str, **labels: str) -> Iterable[Sample]:
        """Samples of `name` whose labels include `labels`."""
        return (
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def total(self, name: str, **labels: str) -> float:
        """The sum over the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(s.value for s in self.matching(name, **labels))

    def get(self, name: str, **labels: str) -> float | None:
        """Like `total`, but None when no sample matches (a series the server never made)."""
        found = [s.value for s in self.matching(name, **labels)]
        return sum(found) if found else None

    def by(self, name: str, *label_names: str, **labels: str) -> dict[tuple[str, ...], float]:
        """Samples of `name` summed by the values of `label_names` ("" where one is missing)."""
        out: dict[tuple[str, ...], float] = {}
        for s in self.matching(name, **labels):
            key = tuple(s.labels.get(n, "") for n in label_names)
            out[key] = out.get(key, 0.0) + s.value
        return out

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def metrics_text(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        return str(response.read().decode())


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> Scrape:
    """One scrape of a metrics port."""
    return Scrape.parse(metrics_text(port, host, timeout))
