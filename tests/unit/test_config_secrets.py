"""The etcd password from a file or the environment, never only from a flag that shows in ps."""

import pytest

from netplugin.config import read_password_file, resolve_password
from netplugin.errors import InvalidInput


def test_password_file_loses_one_trailing_newline_only(tmp_path):
    path = tmp_path / "pw"
    path.write_text("s3cret \n")
    assert read_password_file(str(path)) == "s3cret "
    path.write_text("s3cret\r\n")
    assert read_password_file(str(path)) == "s3cret"
    path.write_text("a\n\n")
    assert read_password_file(str(path)) == "a\n"


@pytest.mark.parametrize("content,message", [("", "is empty"), ("\n", "is empty"), (b"\xff\xfe", "not UTF-8")])
def test_password_file_errors(tmp_path, content, message):
    path = tmp_path / "pw"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidInput, match=message):
        read_password_file(str(path))


def test_missing_password_file_names_it(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read the etcd password file '.*nope': No such file"):
        read_password_file(str(tmp_path / "nope"))


def test_resolve_password(tmp_path):
    path = tmp_path / "pw"
    path.write_text("from-file\n")
    assert resolve_password(None, str(path)) == "from-file"
    assert resolve_password("from-flag", None) == "from-flag"
    assert resolve_password(None, None) is None
    with pytest.raises(InvalidInput, match="given twice"):
        resolve_password("from-flag", str(path))
