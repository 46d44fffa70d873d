import json
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from lightcook.io import (
    atomic_dir,
    atomic_path,
    bytes_on_disk,
    read_checkpoint,
    write_json_atomic,
    write_text_atomic,
)


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


def _checkpoint(tmp_path, **kwargs):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 7, "state_dict": {"w": torch.arange(4096.0)}}, path, **kwargs)
    return path


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_read_checkpoint_loads_both_torch_formats(tmp_path, zipped):
    data = read_checkpoint(_checkpoint(tmp_path, _use_new_zipfile_serialization=zipped))
    assert data["global_step"] == 7 and torch.equal(data["state_dict"]["w"], torch.arange(4096.0))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint_names_the_file_and_the_damage(tmp_path, zipped):
    path = _checkpoint(tmp_path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(path))}: truncated or corrupt \(\d+ bytes\)"
    ) as err:
        read_checkpoint(path)
    assert "weights_only" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"the checkpoint file is empty \(0 bytes\)"),
        (b"not a checkpoint at all", r"neither a zip archive .* nor a readable legacy torch pickle"),
    ],
)
def test_empty_or_foreign_file_says_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{match}"):
        read_checkpoint(path)


def test_refused_object_is_named_and_not_called_corruption(tmp_path):
    path = tmp_path / "omega.ckpt"
    torch.save({"hyper_parameters": OmegaConf.create({"lr": 1.0})}, path)
    with pytest.raises(ValueError, match=r"refuses \(omegaconf.dictconfig.DictConfig\)"):
        read_checkpoint(path)


def test_missing_or_non_dict_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.ckpt: no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"list.ckpt: holds a list, not a checkpoint dict"):
        read_checkpoint(tmp_path / "list.ckpt")
