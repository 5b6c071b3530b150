"""Print the requirements of pyproject.toml extras, one per line, so install scripts never repeat them.

    python scripts/extra_requirements.py vllm-serve            # every requirement of the extra
    python scripts/extra_requirements.py dev:pytest,openai     # only the named packages of an extra
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def main(argv: list[str]) -> int:
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    for spec in argv:
        name, _, only = spec.partition(":")
        if name not in extras:
            print(f"no extra `{name}` in pyproject.toml (have: {', '.join(sorted(extras))})", file=sys.stderr)
            return 2
        wanted = set(only.split(",")) if only else None
        for req in extras[name]:
            package = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
            if wanted is None or package in wanted:
                print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
