"""The generated code in serving/pb matches what `make protos` would write from protos/."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import PYTHON, ROOT


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    # protoc runs in its own process: inside a pytest process that has already imported
    # TensorFlow (whose bundled protobuf symbols clash with grpc_tools') it can crash.
    script = (
        "import sys; sys.path.insert(0, 'scripts'); import gen_protos; from pathlib import Path; "
        f"print('\\n'.join(map(str, gen_protos.generate(Path({str(tmp_path)!r})))))"
    )
    done = subprocess.run(
        [PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    written = [Path(line) for line in done.stdout.splitlines() if line]
    assert written, "no .proto files found"
    stale = [
        str(rel)
        for rel in written
        if not (ROOT / "serving" / "pb" / rel).is_file()
        or (ROOT / "serving" / "pb" / rel).read_text() != (tmp_path / rel).read_text()
    ]
    assert not stale, f"serving/pb is stale for {stale}: run `make protos`"
