"""The checked-in generated code matches proto/ (regenerate with ./dev proto)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path):
    _generator().generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "the generator produced nothing"
    stale = []
    for rel in fresh:
        checked_in = ROOT / "proto" / rel
        if not checked_in.exists() or checked_in.read_bytes() != (tmp_path / rel).read_bytes():
            stale.append(str(rel))
    checked = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*_pb2*.py*"))
    extra = sorted(set(map(str, checked)) - set(map(str, fresh)))
    assert not stale and not extra, (
        f"generated code is stale ({stale}) or orphaned ({extra}); run ./dev proto"
    )


def test_generated_package_is_the_one_imported():
    import raftka.v1.metadata_pb2 as metadata_pb2

    assert Path(metadata_pb2.__file__).resolve().is_relative_to(ROOT / "proto"), sys.path
