"""`make fuzz`, REST half: the REST API fuzzed from its own OpenAPI document by schemathesis.

Schemathesis reads /openapi.json from the live server (its model names and versions pinned to
those the server holds, and one unknown of each) and, for every operation, sends requests
built from the document's schemas and examples, their edge cases (the coverage phase) and random
ones (fuzzing): bodies, paths, query strings and headers that do and do not fit the schemas. The
one check is that nothing is answered 5xx; then the server must still answer a valid request.

    python -m harness.fuzz_rest --models-dir models --model mnist --max-examples 200
    python -m harness.fuzz_rest --url http://127.0.0.1:8000 --max-examples 5   # a running server
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from harness.models import one_model_repository
from harness.process import ServerProcess

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def pinned_document(url: str, folder: Path) -> Path:
    """The server's document with its path parameters narrowed to the models it serves (and one
    it does not), so that most requests reach the body's parsing instead of a 404."""
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as response:
        doc = json.loads(response.read())
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        models = json.loads(response.read())["models"]
    names = [m["name"] for m in models] + ["nope"]
    versions = [str(v["version"]) for m in models for v in m["versions"]] + ["99", "x"]
    for ops in doc["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "model_name":
                    param["schema"] = {"type": "string", "enum": names}
                elif param["name"] == "model_version":
                    param["schema"] = {"type": "string", "enum": versions}
    path = folder / "openapi.json"
    path.write_text(json.dumps(doc))
    return path


def fuzz(url: str, max_examples: int, token: str | None = None, seed: int = 0) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return _fuzz(pinned_document(url, Path(tmp)), url, max_examples, token, seed)


def _fuzz(document: Path, url: str, max_examples: int, token: str | None, seed: int) -> int:
    cmd = [
        str(SCHEMATHESIS), "run", str(document), "--url", url,
        "--checks", "not_a_server_error", "--max-examples", str(max_examples),
        "--seed", str(seed), "--request-timeout", "60", "--no-color",
    ]  # fmt: skip
    if token is not None:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode


def still_answers(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        models = json.loads(response.read())["models"]
    return response.status == 200 and bool(models)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="a running server's REST API (else one is started)")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist", help="the model the started server serves")
    p.add_argument("--max-examples", type=int, default=200, help="per operation and phase")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.url:
        code = fuzz(a.url, a.max_examples, seed=a.seed)
        return code or (0 if still_answers(a.url) else 1)
    with tempfile.TemporaryDirectory() as tmp, one_model_repository(a.models_dir, a.model) as repo:
        with ServerProcess(repo, http=True, log_path=Path(tmp) / "server.log") as proc:
            code = fuzz(proc.http_url, a.max_examples, seed=a.seed)
            ok = still_answers(proc.http_url)
            logs = proc.logs()
        if "Traceback" in logs:
            print("the server logged a traceback:\n" + logs[-4000:])
            return 1
    return code or (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
