"""Atomic writes of run files and the cached stage (dpost.workdir)."""

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


def test_a_stage_runs_once_and_is_read_back_after(tmp_path):
    """`StageDir.cached` runs an unfinished stage, writes its manifest (the fields, the config
    hash, the seconds), and from then on returns what `load` reads without running it again."""
    stage = workdir.StageDir(epath.Path(tmp_path) / "iter_1" / "pairs", "hash-a")
    calls = []

    def run():
        calls.append(1)
        (stage.path / "rows.txt").write_text("a b")
        return ["a", "b"], {"pairs": 2}

    def load(done):
        return (done.path / "rows.txt").read_text().split()

    result, manifest = stage.cached(run, load)
    assert result == ["a", "b"] and calls == [1]
    assert manifest["pairs"] == 2 and manifest["config_hash"] == "hash-a" and manifest["stage"] == "pairs"
    assert manifest["seconds"] >= 0
    assert json.loads(stage.manifest_path.read_text()) == manifest
    again, manifest_again = stage.cached(run, load)
    assert again == ["a", "b"] and manifest_again == manifest and calls == [1]


def test_a_stage_of_another_config_or_without_manifest_runs(tmp_path):
    """Outputs without a manifest (an interrupted stage) and a manifest of another config hash do
    not count as finished: the stage runs, with what was left in its folder to resume from."""
    path = epath.Path(tmp_path) / "iter_1" / "sample_pairs"
    path.mkdir(parents=True)
    (path / "shard_00000.jsonl").write_text("{}\n")
    seen = []

    def run():
        seen.append(sorted(p.name for p in path.iterdir()))
        return None, {"shards": 1}

    workdir.StageDir(path, "hash-a").cached(run, load=lambda done: None)
    workdir.StageDir(path, "hash-b").cached(run, load=lambda done: None)
    assert seen == [["shard_00000.jsonl"], ["manifest.json", "shard_00000.jsonl"]]
    assert json.loads((path / workdir.MANIFEST).read_text())["config_hash"] == "hash-b"
