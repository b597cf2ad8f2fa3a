"""Print one extra of pyproject.toml (default: serve) as requirement lines, one a line.

The images install exactly these, with requirements/constraints.txt, and so does the test that
runs the serve image's command in a serve-only virtual environment:

    python scripts/extra_requirements.py > serve.txt
    pip install -c requirements/constraints.txt -r serve.txt

Only the dependencies are installed, not the project: the images copy its code, so a code change
does not reinstall them. --onnxruntime-gpu VERSION swaps onnxruntime for onnxruntime-gpu (both ship
the `onnxruntime` module and must never be installed together). Only the standard library is
used, so the script runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(line: str) -> str:
    """The normalized project name of a requirement line ("onnxruntime==1.2" -> "onnxruntime")."""
    match = _NAME.match(line)
    if match is None:
        raise ValueError(f"not a requirement: {line!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def extra_requirements(
    extra: str = "serve",
    pyproject: Path = ROOT / "pyproject.toml",
    onnxruntime_gpu: str | None = None,
) -> list[str]:
    with pyproject.open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    if extra not in extras:
        raise ValueError(f"no extra {extra!r} in {pyproject}; there are {', '.join(extras)}")
    lines = [str(r) for r in extras[extra]]
    if onnxruntime_gpu is not None:
        swapped = [r for r in lines if requirement_name(r) != "onnxruntime"]
        if len(swapped) == len(lines):
            raise ValueError(f"the {extra} extra has no onnxruntime requirement to swap")
        lines = [*swapped, f"onnxruntime-gpu=={onnxruntime_gpu}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="extra_requirements.py", description="Print an extra of pyproject.toml."
    )
    p.add_argument("--extra", default="serve", help="which extra (default: serve)")
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    p.add_argument(
        "--onnxruntime-gpu", metavar="VERSION", help="install onnxruntime-gpu==VERSION instead"
    )
    args = p.parse_args(argv)
    try:
        lines = extra_requirements(args.extra, args.pyproject, args.onnxruntime_gpu)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
