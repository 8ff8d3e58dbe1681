"""Atomic writes keep the user's umask: files 0666 & ~umask, folders 0777 & ~umask (not tempfile's 0600/0700)."""

import os
import stat

import pytest
from PIL import Image

from vil_hf.io_utils import atomic_save_image, atomic_write_text, current_umask, make_temporary_folder


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    assert current_umask() == umask
    text = atomic_write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
    picture = atomic_save_image(tmp_path / "a" / "p.png", Image.new("RGB", (2, 2)))
    folder = make_temporary_folder(tmp_path, ".partial-")
    assert text.read_text() == "x: 1\n"
    assert _mode(text) == _mode(picture) == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask
    # what a plain open() gives, for comparison
    (tmp_path / "plain").write_text("")
    assert _mode(tmp_path / "plain") == _mode(text)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()  # renaming a file onto a folder fails
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "taken", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
