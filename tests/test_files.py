"""Outputs are written atomically and never over an earlier run or credentials unless asked (security review L1)."""

from __future__ import annotations

import os
import stat

import pytest

from fedtt.config import load_config
from fedtt.engines import devcerts
from fedtt.engines.sites import write_site_files
from fedtt.files import atomic_write, prepare_out_dir, replace_dir


def test_atomic_write_leaves_the_old_file_and_no_temporary_behind_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not str or bytes: fails mid-write
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    (tmp_path / "results.json.tmp").symlink_to(tmp_path / "elsewhere")  # a fixed temp name would follow this link
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and not (tmp_path / "elsewhere").exists()


def test_replace_dir_swaps_a_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "adapter"
    replace_dir(target, lambda d: (d / "a.txt").write_text("1"))
    assert (target / "a.txt").read_text() == "1"

    def half_written(d):
        (d / "b.txt").write_text("2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(target, half_written)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_new_run_refuses_an_old_one_and_overwrite_clears_all_its_state(tmp_path):
    for name in ("results.json", "results.md", "checkpoint.safetensors"):
        (tmp_path / name).write_text("old")
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_out_dir(tmp_path, overwrite=False)
    prepare_out_dir(tmp_path, overwrite=True)
    assert not any((tmp_path / n).exists() for n in ("results.json", "results.md", "checkpoint.safetensors"))


def test_devcerts_never_replaces_a_ca_unless_asked(tmp_path):
    paths = devcerts.generate(tmp_path, nodes=0)
    ca = paths["ca_key"].read_bytes()
    with pytest.raises(FileExistsError, match="locks out every site"):
        devcerts.generate(tmp_path, nodes=0)
    assert paths["ca_key"].read_bytes() == ca
    assert devcerts.main(["--out", str(tmp_path), "--nodes", "0"]) == 2
    devcerts.generate(tmp_path, nodes=0, overwrite=True)
    assert paths["ca_key"].read_bytes() != ca


def test_site_files_are_private_to_their_owner(tmp_path):
    config = load_config(None, ["task.name='sms_spam'", "federation.num_clients=2", "task.max_train_examples=40",
                                "federation.partition='iid'"])
    paths = write_site_files(config, tmp_path / "sites")
    assert len(paths) == 2 and all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in paths)
    assert stat.S_IMODE(os.stat(tmp_path / "sites").st_mode) & 0o077 == 0
