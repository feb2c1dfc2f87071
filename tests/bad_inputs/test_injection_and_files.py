"""Bad-input corpus for HTML outputs, notebook names, file permissions and leftovers (issue items 2, 3, 7):
hostile chip ids, region names and run.json fields never become markup or code."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from reliability_helpers import tiny_store

from workbench.io import TEMP_MARK, atomic_directory, sweep_leftovers, write_json_atomic, write_text_atomic

HOSTILE_ID = "chip`);alert(1);//${alert(2)}</script><img src=x onerror=alert(3)>"
HOSTILE_REGION = "north</script><script>alert(4)</script>"


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids = [f"{HOSTILE_ID}{n}" for n in range(8)]
    return tiny_store(tmp_path_factory.mktemp("inject") / "store", chip_ids=ids, regions=[HOSTILE_REGION] * 8)


def scripts(page: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)


def test_map_tooltips_are_escaped_json_strings_not_template_literals(hostile_store: Path, tmp_path: Path) -> None:
    from workbench.audit import save_map_html, split_map
    from workbench.data.store import read_catalog

    page = save_map_html(
        split_map(read_catalog(hostile_store), backend="folium", basemap=False), tmp_path / "map.html"
    ).read_text()
    assert "alert(1)" in page  # the id is shown ...
    assert "<img" not in page and "<script>alert(4)" not in page  # ... but never as markup
    for body in scripts(page):
        assert "bindTooltip(`" not in body  # no template literal: a backtick or ${ cannot break out
        assert "alert(4)</script>" not in body
    tooltips = re.findall(r"bindTooltip\((\".*?\"), ", page)
    assert len(tooltips) == 8
    import json

    shown = json.loads(tooltips[0])  # a JSON string literal holding escaped HTML
    assert "&lt;img src=x onerror=alert(3)&gt;" in shown and "`);alert(1)" in shown


def test_chip_explorer_caption_escapes_the_chip_id(hostile_store: Path) -> None:
    from workbench.audit.explorer import chip_explorer
    from workbench.data.store import read_catalog

    explorer = chip_explorer(hostile_store, read_catalog(hostile_store), ["B02", "B03", "B04", "B11"])
    caption = explorer.caption.value
    assert "<img" not in caption and "</script>" not in caption
    assert "&lt;img src=x onerror=alert(3)&gt;" in caption


def test_index_escapes_every_run_json_field(tmp_path: Path) -> None:
    from workbench import pipeline

    run = tmp_path / "demo" / "r1"
    write_json_atomic(
        run / "run.json",
        {
            "experiment": "<script>alert(5)</script>",
            "run_id": "<img src=x onerror=alert(6)>",
            "status": '"><script>alert(7)</script>',
            "started": "<b>2026",
            "params_file": "<svg onload=alert(8)>",
            "overrides": ["seed=<script>alert(9)</script>"],
        },
    )
    page = pipeline.write_index(tmp_path).read_text()
    runs_table = page.split('<table id="runs">', 1)[1].split("</table>", 1)[0]  # the page's own sort script aside
    assert not re.search(r"<(script|img|svg|b)\b", runs_table)
    for text in ("&lt;script&gt;alert(5)", "&lt;img src=x onerror=alert(6)&gt;", "&lt;svg onload=alert(8)&gt;"):
        assert text in page


def test_notebooks_option_accepts_only_the_four_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench import pipeline
    from workbench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "params/demo.yaml", "--notebooks", "../../x", "--reports", str(tmp_path)])
    assert exit_.value.code == 2 and "invalid choice: '../../x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown notebook\(s\) \['\.\./\.\./x'\]; choose among the stages"):
        pipeline.run_pipeline("params/demo.yaml", reports=tmp_path, notebooks=["../../x"])
    assert not list(tmp_path.iterdir())  # refused before a run directory exists


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_users_normal_permissions(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = write_text_atomic(tmp_path / "report.json", "{}")
        with atomic_directory(tmp_path / "store") as folder:
            (folder / "x").write_text("1")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".store.{TEMP_MARK}-999999999-abcd.partial"  # an interrupted ingest
    dead.mkdir()
    (dead / "chips.zarr").mkdir()
    mine = tmp_path / f".metrics.json.{TEMP_MARK}-{os.getpid()}-beef.tmp"
    mine.write_text("{")
    old = tmp_path / ".run.old"  # a folder replacement cut between its two renames
    old.mkdir()
    found = sweep_leftovers(tmp_path)
    assert found.removed == [dead] and not dead.exists()
    assert found.kept == [mine] and mine.exists()
    assert found.restored == [tmp_path / "run"] and (tmp_path / "run").is_dir()
    assert "removed 1 leftover(s)" in found.summary()
    # an ingest into the same destination cleans up after an interrupted one first
    dead.mkdir()
    with atomic_directory(tmp_path / "store") as folder:
        (folder / "catalog.parquet").write_text("x")
    assert not dead.exists() and (tmp_path / "store" / "catalog.parquet").is_file()


def test_free_space_is_checked_before_a_large_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.io import InsufficientSpaceError

    write_text_atomic(tmp_path / "a.json", "old")
    monkeypatch.setattr("workbench.io.free_bytes", lambda directory: 1000)
    with pytest.raises(InsufficientSpaceError, match=r"not enough free space in .* a\.json: it needs about"):
        write_text_atomic(tmp_path / "a.json", "x" * 5000)
    assert (tmp_path / "a.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
