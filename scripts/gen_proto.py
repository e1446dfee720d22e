"""Generate the Python code for proto/raftka/v1/*.proto into proto/.

One command: ``./dev proto``. ``tests/test_proto_fresh.py`` fails when the
checked-in code differs from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> None:
    files = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "raftka" / "v1").glob("*.proto")
    )
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    generate(target)
    print(f"generated into {target}")
