"""output/fsutil.py: the one atomic write and the one publish."""

from __future__ import annotations

import os

import pytest

from rcpu_lite.output import fsutil


def test_atomic_write_leaves_the_old_file_and_no_temporary_when_the_write_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert fsutil.write_json(path, {"a": 1}) == path.stat().st_size and path.read_text() == '{\n  "a": 1\n}\n'


def test_publish_replaces_out_and_removes_the_manifest_last(tmp_path):
    out, work = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    work.mkdir()
    (work / "model.safetensors").write_text("new")
    (work / "rcpu_progress.json").write_text("{}")
    fsutil.publish(work, out, remove_last="rcpu_progress.json")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old output is gone, no aside left


def test_a_failed_publish_puts_the_old_output_back(tmp_path, monkeypatch):
    """The old output is moved aside, never deleted first: if the new one cannot take its name, it comes back."""
    out, work = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    work.mkdir()
    (work / "new.txt").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(work):
            raise OSError("interrupted")
        return real_rename(src, dst)

    monkeypatch.setattr("pathlib.os.rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        fsutil.publish(work, out)
    assert (out / "old.txt").read_text() == "old" and (work / "new.txt").is_file()
