"""The generated code in serving/pb matches what `make protos` would write from protos/."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gen_protos  # noqa: E402


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = gen_protos.generate(tmp_path)
    assert written, "no .proto files found"
    stale = [
        str(rel)
        for rel in written
        if not (ROOT / "serving" / "pb" / rel).is_file()
        or (ROOT / "serving" / "pb" / rel).read_text() != (tmp_path / rel).read_text()
    ]
    assert not stale, f"serving/pb is stale for {stale}: run `make protos`"
