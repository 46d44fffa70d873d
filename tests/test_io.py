import json
import os

import pytest

from lightcook.io import atomic_dir, atomic_path, bytes_on_disk, write_json_atomic, write_text_atomic


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_folder_write_keeps_previous_folder(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"12345")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
        raise RuntimeError("crash")
    assert (target / "w.bin").read_bytes() == b"12345" and bytes_on_disk(target) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_atomic_writes_get_the_modes_a_plain_write_gets(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
