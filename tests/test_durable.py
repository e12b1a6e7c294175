"""data.durable: a replaced file holds the old content or the new, never a part; the file is on disk
before the rename and the rename before the call returns; no temporary is left behind."""

import os
import stat

import pytest

from data import durable
from data.durable import write_atomic, write_durably, write_text_atomic


def test_write_text_atomic_replaces_the_file_and_leaves_only_it(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_text_atomic(path, "new ü\n")
    assert path.read_bytes() == "new ü\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step_000001")

    def fail_midway(f):
        f.write(b"step_0000")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, fail_midway)
    assert path.read_text() == "step_000001"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"\x00\x01"))
    assert events == ["fsync file", "rename", "fsync folder"]
    events.clear()
    write_durably(tmp_path / "b.bin", lambda f: f.write(b"\x02"))
    assert events == ["fsync file"] and (tmp_path / "b.bin").read_bytes() == b"\x02"


def test_the_umask_sets_the_permissions_as_for_any_new_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic", "x")
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
