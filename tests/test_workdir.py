"""Atomic writes of run files (dpost.workdir)."""

from __future__ import annotations

import json

from etils import epath

from dpost import workdir


def test_atomic_write_replaces_an_existing_file(tmp_path):
    """Rerunning a finished run rewrites results.json/report.md: the rename must overwrite, and no
    temporary file may be left beside the target."""
    path = epath.Path(tmp_path) / "results.json"
    workdir.write_json_atomic(path, {"round": 1})
    workdir.write_json_atomic(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 2}
    assert sorted(p.name for p in epath.Path(tmp_path).iterdir()) == ["results.json"]
