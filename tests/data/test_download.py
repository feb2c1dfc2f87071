"""Data set downloads against a local HTTP server on 127.0.0.1: resume, checksums, offline, bad destinations."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from workbench.cli import main
from workbench.data import download as dl
from workbench.data.download import (
    DATASETS,
    MANIFEST,
    ChecksumError,
    Dataset,
    DownloadError,
    ManualDownloadError,
    OfflineError,
    RemoteFile,
    download,
    fetch_file,
)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class ServerState:
    """Files served, requests seen, and how many GETs of each path are cut half-way."""

    files: dict[str, bytes] = field(default_factory=dict)
    json_docs: dict[str, Any] = field(default_factory=dict)
    cuts: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    """Serves bytes with Range support; a cut sends the full Content-Length, half the body, then closes."""

    state: ServerState

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        state.requests.append((self.path, self.headers.get("Range")))
        if path in state.json_docs:
            doc = state.json_docs[path]
            body = json.dumps(doc(query) if callable(doc) else doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path not in state.files:
            self.send_error(404)
            return
        data = state.files[path]
        start = 0
        ranged = self.headers.get("Range")
        if ranged:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cuts.get(path, 0) > 0:
            state.cuts[path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """A threaded HTTP server on 127.0.0.1 and an ephemeral port; yields (base URL, state)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Dataset]:
    """A private copy of the registry that tests may extend."""
    entries = dict(DATASETS)
    monkeypatch.setattr(dl, "DATASETS", entries)
    return entries


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_entry(files: tuple[str, ...], checksums: dict[str, str] | None = None, **extra: Any) -> Dataset:
    return Dataset(
        name="toy",
        title="toy data",
        kind="http",
        base_url="http://127.0.0.1:1",
        ingest="npz",
        licence="CC0",
        citation="nobody",
        page="http://127.0.0.1:1/",
        files=files,
        checksums=checksums or {},
        **extra,
    )


def test_resume_after_cut_connection(server: tuple[str, ServerState], tmp_path: Path) -> None:
    base, state = server
    state.files["/data/a.bin"] = PAYLOAD
    state.cuts["/data/a.bin"] = 2  # the first two GETs end half-way
    remote = RemoteFile(f"{base}/data/a.bin", "a.bin", len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest())
    record = fetch_file(remote, tmp_path, retries=3, backoff=0.0, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()
    assert record["verified"] == "md5" and record["status"] == "fetched"
    ranges = [r for p, r in state.requests if p == "/data/a.bin"]
    assert ranges[0] is None
    # each retry asked only for the bytes the .part file did not hold yet
    assert ranges[1] == f"bytes={len(PAYLOAD) // 2}-"
    assert ranges[2] == f"bytes={len(PAYLOAD) // 2 + len(PAYLOAD) // 4}-"
    assert len(ranges) == 3


def test_existing_part_file_is_resumed(server: tuple[str, ServerState], tmp_path: Path) -> None:
    base, state = server
    state.files["/b.bin"] = PAYLOAD
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD[:1000])
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    fetch_file(RemoteFile(f"{base}/b.bin", "b.bin", sha256=sha), tmp_path, backoff=0.0, progress=False)
    assert state.requests == [("/b.bin", "bytes=1000-")]
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused(server: tuple[str, ServerState], tmp_path: Path) -> None:
    base, state = server
    state.files["/c.bin"] = PAYLOAD
    remote = RemoteFile(f"{base}/c.bin", "c.bin", md5="0" * 32)
    with pytest.raises(ChecksumError, match=r"c\.bin.*md5"):
        fetch_file(remote, tmp_path, backoff=0.0, progress=False)
    assert not (tmp_path / "c.bin").exists()
    assert not (tmp_path / "c.bin.part").exists()


def test_gives_up_after_retries_and_leaves_only_the_part(server: tuple[str, ServerState], tmp_path: Path) -> None:
    base, state = server
    state.files["/d.bin"] = PAYLOAD
    state.cuts["/d.bin"] = 99
    with pytest.raises(DownloadError, match=r"gave up on d\.bin.*resumes"):
        fetch_file(RemoteFile(f"{base}/d.bin", "d.bin"), tmp_path, retries=1, backoff=0.0, progress=False)
    assert not (tmp_path / "d.bin").exists()
    assert 0 < (tmp_path / "d.bin.part").stat().st_size < len(PAYLOAD)


def test_http_entry_with_url_base_writes_manifest_and_cli(
    server: tuple[str, ServerState], tmp_path: Path, registry: dict[str, Dataset], capsys: pytest.CaptureFixture[str]
) -> None:
    base, state = server
    small = b"chip data\n" * 100
    state.files["/mirror/x/one.npz"] = small
    state.files["/mirror/two.npz"] = PAYLOAD
    registry["toy"] = http_entry(("x/one.npz", "two.npz"), {"two.npz": f"sha256:{hashlib.sha256(PAYLOAD).hexdigest()}"})
    dest = tmp_path / "toy"
    code = main(["download", "toy", str(dest), "--url-base", f"{base}/mirror", "--quiet"])
    assert code == 0
    assert (dest / "x" / "one.npz").read_bytes() == small
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["dataset"] == "toy"
    assert [f["name"] for f in manifest["files"]] == ["x/one.npz", "two.npz"]
    assert [f["verified"] for f in manifest["files"]] == [None, "sha256"]
    assert manifest["next"] == f"workbench ingest npz {dest} stores/toy"
    assert "workbench ingest npz" in capsys.readouterr().out
    # a second run finds the files complete and fetches nothing
    state.requests.clear()
    result = download("toy", dest, url_base=f"{base}/mirror", progress=False)
    assert state.requests == []
    assert {f["status"] for f in result.files} == {"present"}


def test_zenodo_record_checksums_and_extraction(
    server: tuple[str, ServerState], tmp_path: Path, registry: dict[str, Dataset]
) -> None:
    base, state = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("TrainData/img/image_1.h5", b"img")
        zipped.writestr("TrainData/mask/mask_1.h5", b"mask")
    archive = buffer.getvalue()
    state.files["/api/records/42/files/TrainData.zip/content"] = archive
    state.json_docs["/api/records/42"] = {
        "files": [
            {
                "key": "TrainData.zip",
                "size": len(archive),
                "checksum": f"md5:{hashlib.md5(archive).hexdigest()}",
                "links": {"self": f"{base}/api/records/42/files/TrainData.zip/content"},
            }
        ]
    }
    registry["l4s-test"] = Dataset(
        name="l4s-test",
        title="zenodo toy",
        kind="zenodo",
        base_url="https://zenodo.org",
        record="42",
        extract=True,
        ingest="landslide4sense",
        licence="CC BY 4.0",
        citation="x",
        page="x",
    )
    result = download("l4s-test", tmp_path / "l4s", url_base=base, progress=False)
    assert (tmp_path / "l4s" / "TrainData" / "img" / "image_1.h5").read_bytes() == b"img"
    assert result.files[0]["verified"] == "md5"
    assert result.files[0]["extracted_to"] == "TrainData"

    # a registry checksum that disagrees with the record is refused before any transfer
    registry["l4s-test"] = Dataset(
        **{**registry["l4s-test"].__dict__, "checksums": {"TrainData.zip": "md5:" + "1" * 32}}
    )
    with pytest.raises(ChecksumError, match="registry"):
        download("l4s-test", tmp_path / "other", url_base=base, progress=False)
    assert not (tmp_path / "other" / "TrainData.zip").exists()


def test_gcs_listing_is_paged_and_md5_checked(
    server: tuple[str, ServerState], tmp_path: Path, registry: dict[str, Dataset]
) -> None:
    base, state = server
    blobs = {"v1/S2Hand/a_S2Hand.tif": b"s2" * 50, "v1/S2Hand/b_S2Hand.tif": b"s2b" * 50}
    for name, data in blobs.items():
        state.files[f"/bucket/{name}"] = data

    def listing(query: str) -> dict[str, Any]:
        items = [
            {"name": name, "size": str(len(data)), "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode()}
            for name, data in blobs.items()
        ]
        if "pageToken=p2" in query:
            return {"items": items[1:]}
        return {"items": items[:1], "nextPageToken": "p2"}

    state.json_docs["/storage/v1/b/bucket/o"] = listing
    registry["gcs-test"] = Dataset(
        name="gcs-test",
        title="gcs toy",
        kind="gcs",
        base_url="https://storage.googleapis.com",
        bucket="bucket",
        prefixes=("v1/S2Hand/",),
        ingest="sen1floods11",
        licence="x",
        citation="x",
        page="x",
    )
    result = download("gcs-test", tmp_path / "s1f", url_base=base, progress=False)
    for name, data in blobs.items():
        assert (tmp_path / "s1f" / name).read_bytes() == data
    assert [f["verified"] for f in result.files] == ["md5", "md5"]


def test_offline_fails_fast_and_writes_nothing_final(tmp_path: Path, registry: dict[str, Dataset]) -> None:
    registry["toy"] = http_entry(("a.bin",))
    dest = tmp_path / "toy"
    start = time.monotonic()
    with pytest.raises(OfflineError, match=r"offline.*copy the destination folder.*workbench ingest npz"):
        download("toy", dest, url_base=f"http://127.0.0.1:{free_port()}", progress=False, connect_timeout=2.0)
    assert time.monotonic() - start < 5
    assert not (dest / "a.bin").exists()
    assert not (dest / MANIFEST).exists()


def test_offline_cli_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["download", "sen1floods11", str(tmp_path / "s"), "--url-base", f"http://127.0.0.1:{free_port()}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "appears to be offline" in err and "workbench ingest sen1floods11" in err
    assert list((tmp_path / "s").iterdir()) == []


def test_destination_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["download", "sen1floods11", str(blocker / "data")])
    assert code == 1
    err = capsys.readouterr().err
    assert str(blocker / "data") in err and "choose a folder you can write to" in err


def test_read_only_destination(tmp_path: Path) -> None:
    dest = tmp_path / "ro"
    dest.mkdir()
    dest.chmod(0o500)
    try:
        if os.access(dest, os.W_OK):
            pytest.skip("running with privileges that ignore folder permissions")
        with pytest.raises(DownloadError, match=r"chmod u\+w"):
            dl.check_writable(dest)
    finally:
        dest.chmod(0o700)


def test_hub_download_goes_through_snapshot_download(
    monkeypatch: pytest.MonkeyPatch, server: tuple[str, ServerState], tmp_path: Path
) -> None:
    base, _ = server
    calls: list[dict[str, Any]] = []

    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    # model building switches the Hub offline by default; an explicit download lifts that for its duration
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append({**kwargs, "offline": hub_constants.is_offline_mode()})
        shard = Path(kwargs["local_dir"]) / "tien_shan" / "2023" / "shard_000.parquet"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"PAR1")
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dest = tmp_path / "cryo"
    result = download("cryosentinel", dest, url_base=base, progress=False)
    assert calls[0]["repo_id"] == "abzal-glw/cryosentinel-glof-v3"
    assert calls[0]["repo_type"] == "dataset"
    assert calls[0]["local_dir"] == str(dest)
    assert calls[0]["endpoint"] == base
    assert calls[0]["offline"] is False
    assert hub_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert [f["name"] for f in result.files] == ["tien_shan/2023/shard_000.parquet"]
    assert json.loads((dest / MANIFEST).read_text())["next"].startswith("workbench ingest cryosentinel")


def test_manual_source_explains_the_steps(tmp_path: Path) -> None:
    with pytest.raises(ManualDownloadError, match=r"kaggle.*workbench ingest cloud38"):
        download("38-cloud", tmp_path / "c")


def test_list_and_unknown_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("landslide4sense", "cloud38", "sen1floods11", "impactmesh-flood", "cryosentinel"):
        assert f"{name}:" in out
    assert main(["download", "nonesuch", str(tmp_path)]) == 2
    assert "unknown data set 'nonesuch'" in capsys.readouterr().err


def test_a_download_that_would_not_fit_is_refused_at_once_and_keeps_its_part(
    server: tuple[str, ServerState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.io import InsufficientSpaceError

    base, state = server
    state.files["/data/big.bin"] = PAYLOAD  # 1 MiB
    monkeypatch.setattr("workbench.io.free_bytes", lambda directory: 512 * 1024)  # 0.5 MiB free
    remote = RemoteFile(f"{base}/data/big.bin", "big.bin", len(PAYLOAD))
    with pytest.raises(InsufficientSpaceError, match=rf"free space in {tmp_path} to write big\.bin .*1\.0 MiB"):
        fetch_file(remote, tmp_path, retries=3, backoff=0.0, progress=False)
    assert len([p for p, _ in state.requests if p == "/data/big.bin"]) == 1  # not retried: it cannot help
    assert not (tmp_path / "big.bin").exists()


def test_an_archive_that_would_not_fit_unpacked_is_refused_before_extraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.io import InsufficientSpaceError

    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("scenes/a.tif", b"\0" * 3 * 2**20)  # 3 MiB unpacked, a few kB packed
    assert dl.unpacked_bytes(archive) == 3 * 2**20
    monkeypatch.setattr("workbench.io.free_bytes", lambda directory: 2 * 2**20)
    with pytest.raises(InsufficientSpaceError, match=r"contents of scenes\.zip \(unpacked\): it needs about 3\.0 MiB"):
        dl.extract_archive(archive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes.zip"]  # no folder, no partial left


def test_an_unpacked_archive_gets_the_users_normal_permissions(tmp_path: Path) -> None:
    import stat

    from workbench.io import TEMP_MARK

    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a.tif", b"x")
    dead = tmp_path / f".scenes.{TEMP_MARK}-999999999-abcd.partial"  # an extraction that was killed
    dead.mkdir()
    previous = os.umask(0o022)
    try:
        target = dl.extract_archive(archive)
    finally:
        os.umask(previous)
    assert (target / "a.tif").read_bytes() == b"x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes", "scenes.zip"]  # the leftover is gone
