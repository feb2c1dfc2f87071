"""Atomic writes never leave partial files behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.io import atomic_directory, read_json, write_json_atomic, write_text_atomic


def test_write_text_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_json_roundtrip_with_numpy(tmp_path: Path) -> None:
    import numpy as np

    path = write_json_atomic(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(3)})
    assert read_json(path) == {"a": 0.5, "b": [0, 1, 2]}


def test_read_json_errors_name_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        read_json(tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_json(bad)


def test_atomic_directory_keeps_old_content_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "store"
    with atomic_directory(dest) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "f").write_text("v2")
        raise RuntimeError("interrupted")
    assert (dest / "f").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_atomic_directory_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(tmp_path / "d"):
        pass


def test_append_line_closes_a_torn_last_line_and_keeps_the_new_one_whole(tmp_path: Path) -> None:
    from workbench.io import append_line_to

    path = append_line_to(tmp_path / "log" / "decisions.jsonl", '{"a": 1}')  # creates the folder and file
    with open(path, "ab") as handle:
        handle.write(b'{"b": 2')  # a writer killed mid-line
    append_line_to(path, '{"c": 3}')
    append_line_to(path, '{"d": "\u00e9"}')
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2\n{"c": 3}\n{"d": "\xc3\xa9"}\n'
