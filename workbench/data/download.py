"""Fetch the public data sets of the recipes: `workbench download NAME DEST`, run only when asked.

Each data set is an entry of :data:`DATASETS` that says where its files live and how to check them:

* ``http``: a fixed list of files under one base address, with sha256 or md5 where the source publishes them;
* ``zenodo``: a Zenodo record; its file list and md5 checksums come from the record's JSON;
* ``gcs``: objects under prefixes of a public Google Cloud Storage bucket, listed (with md5) over https;
* ``hf``: a data set repository on the Hugging Face Hub, fetched with ``huggingface_hub.snapshot_download``;
* ``manual``: sources that cannot be scripted without a personal account; the command explains the steps.

Files are streamed to ``NAME.part`` and resumed from there with an HTTP Range request after a cut connection
(retried with backoff); the checksum is verified before the rename, so a file under its final name is always
complete. Archives are unpacked beside them when the entry asks for it, and ``download-manifest.json`` in DEST
records what was fetched. Before any transfer the source's host is contacted with a short timeout, so an
offline machine fails at once with a message on how to fetch elsewhere and copy the folder over.

The addresses are plain data in the registry: correct them there, or point ``url_base`` at a mirror.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.io import InsufficientSpaceError, ensure_free_space, sweep_leftovers, temp_name, write_json_atomic

MANIFEST = "download-manifest.json"
CHUNK = 1 << 20
USER_AGENT = "eo-workbench-download/0.1"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download could not be completed; the message names the file or address and the fix."""


class OfflineError(DownloadError):
    """The source's host cannot be reached (no network, a firewall or a wrong address)."""


class ChecksumError(DownloadError):
    """A fetched file does not match the size or checksum the source publishes."""


class ManualDownloadError(DownloadError):
    """The data set cannot be fetched by script; the message lists the manual steps."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its address, its path under DEST and what the source says it should be."""

    url: str
    name: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A registry entry: where a data set lives, its terms, and the ingest command that follows the download."""

    name: str
    title: str
    kind: str  # http | zenodo | gcs | hf | manual
    base_url: str  # file base (http), API host (zenodo, gcs), Hub endpoint (hf) or the page to visit (manual)
    ingest: str  # the `workbench ingest` format that reads the downloaded folder
    licence: str
    citation: str
    page: str
    files: tuple[str, ...] = ()  # http: paths under base_url
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> "md5:<hex>" or "sha256:<hex>"
    record: str | None = None  # zenodo record id
    bucket: str | None = None  # gcs bucket
    prefixes: tuple[str, ...] = ()  # gcs object prefixes
    repo_id: str | None = None  # hf data set repository
    allow_patterns: tuple[str, ...] = ()  # hf: only files matching these patterns (all when empty)
    extract: bool = False  # unpack .zip/.tar archives after verification
    notes: str = ""

    @property
    def source(self) -> str:
        """The source in one phrase: record, bucket, repository or address."""
        if self.kind == "zenodo":
            return f"Zenodo record {self.record} ({self.base_url})"
        if self.kind == "gcs":
            return f"gs://{self.bucket}/ {' '.join(self.prefixes)} via {self.base_url}"
        if self.kind == "hf":
            return f"Hugging Face data set {self.repo_id}"
        return self.base_url


DATASETS: dict[str, Dataset] = {
    entry.name: entry
    for entry in (
        Dataset(
            name="landslide4sense",
            title="Landslide4Sense (Sentinel-2 + slope + DEM patches, HDF5)",
            kind="zenodo",
            base_url="https://zenodo.org",
            record="10463239",
            checksums={"TrainData.zip": "md5:408f09247e3dd256458bc2f6e9edbffb"},
            extract=True,
            ingest="landslide4sense",
            licence="CC BY 4.0",
            citation=(
                "Ghorbanzadeh et al. (2022), Landslide4Sense: Reference Benchmark Data and Deep Learning Models "
                "for Landslide Detection, IEEE TGRS 60; data doi:10.5281/zenodo.10463239"
            ),
            page="https://zenodo.org/records/10463239",
            notes="The record carries masks for the training data only (TrainData/img, TrainData/mask).",
        ),
        Dataset(
            name="cloud38",
            title="38-Cloud (Landsat 8 cloud masks, 384x384 patches)",
            kind="manual",
            base_url="https://www.kaggle.com/datasets/sorour/38cloud-cloud-segmentation-in-satellite-images",
            ingest="cloud38",
            licence="see the dataset page",
            citation=(
                "Mohajerani & Saeedi (2019), Cloud-Net: An End-to-end Cloud Detection Algorithm for Landsat 8 "
                "Imagery, IGARSS 2019"
            ),
            page="https://github.com/SorourMo/38-Cloud-A-Cloud-Segmentation-Dataset",
            notes=(
                "Distributed through Kaggle, which needs a personal API token. With one: "
                "`kaggle datasets download -d sorour/38cloud-cloud-segmentation-in-satellite-images -p DEST --unzip`; "
                "otherwise download the archive from the page in a browser and unzip it into DEST."
            ),
        ),
        Dataset(
            name="sen1floods11",
            title="Sen1Floods11 hand-labelled flood chips (S2 L1C, S1 GRD, labels)",
            kind="gcs",
            base_url="https://storage.googleapis.com",
            bucket="sen1floods11",
            prefixes=(
                "v1.1/data/flood_events/HandLabeled/S2Hand/",
                "v1.1/data/flood_events/HandLabeled/S1Hand/",
                "v1.1/data/flood_events/HandLabeled/LabelHand/",
                "v1.1/splits/flood_handlabeled/",
            ),
            ingest="sen1floods11",
            licence="see github.com/cloudtostreet/Sen1Floods11 and the bucket's v1.1/catalog",
            citation=(
                "Bonafilia et al. (2020), Sen1Floods11: a georeferenced dataset to train and test deep learning "
                "flood algorithms for Sentinel-1, CVPR Workshops 2020"
            ),
            page="https://github.com/cloudtostreet/Sen1Floods11",
        ),
        Dataset(
            name="impactmesh-flood",
            title="ImpactMesh-Flood (S2 L2A, S1 RTC, DEM over four time steps, Copernicus EMS labels)",
            kind="hf",
            base_url="https://huggingface.co",
            repo_id="ibm-esa-geospatial/ImpactMesh-Flood",
            ingest="terramesh",
            licence="CC BY 4.0",
            citation="IBM, DLR and ESA Phi-lab, ImpactMesh (2025), huggingface.co/datasets/ibm-esa-geospatial",
            page="https://huggingface.co/datasets/ibm-esa-geospatial/ImpactMesh-Flood",
            notes=(
                "Modalities come as one tar archive each; unpack them into one folder per modality before the "
                "ingest, and name the bands of each time step as params/impactmesh_flood.yaml describes."
            ),
        ),
        Dataset(
            name="cryosentinel",
            title="CryoSentinel-GLOF v3 glacial-lake chips (S2 L2A, S1, DEM; parquet shards, ~30 GiB)",
            kind="hf",
            base_url="https://huggingface.co",
            repo_id="abzal-glw/cryosentinel-glof-v3",
            ingest="cryosentinel",
            licence="see the dataset card",
            citation="Abdrash (2026), CryoSentinel-GLOF v3, Hugging Face, doi:10.57967/hf/8823",
            page="https://huggingface.co/datasets/abzal-glw/cryosentinel-glof-v3",
        ),
    )
}


# --------------------------------------------------------------------------- registry and checks


def get_dataset(name: str) -> Dataset:
    """The registry entry `name` (case and '_' versus '-' ignored), or a ValueError listing the valid names."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"38-cloud": "cloud38", "impactmesh": "impactmesh-flood", "l4s": "landslide4sense"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; `workbench download --list` shows: {', '.join(DATASETS)}")
    return DATASETS[key]


def describe_datasets() -> str:
    """The registry as text: name, title, source, licence and the ingest that follows."""
    lines = []
    for entry in DATASETS.values():
        lines.append(f"{entry.name}: {entry.title}")
        lines.append(f"    source:  {entry.source}")
        lines.append(f"    page:    {entry.page}")
        lines.append(f"    licence: {entry.licence}")
        lines.append(f"    cite:    {entry.citation}")
        lines.append(f"    then:    workbench ingest {entry.ingest} DEST STORE")
        if entry.notes:
            lines.append(f"    note:    {entry.notes}")
    return "\n".join(lines)


def ingest_hint(entry: Dataset, dest: Path) -> str:
    """The command that turns the downloaded folder into a chip store."""
    return f"workbench ingest {entry.ingest} {dest} stores/{entry.name}"


def check_writable(dest: Path) -> Path:
    """Create `dest` if needed and prove a file can be written there; otherwise a DownloadError with the fix."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=dest)
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise DownloadError(
            f"cannot write to the download destination {dest}: {exc.strerror or exc}; choose a folder you can "
            f"write to (for example data/{dest.name}) or fix its permissions (chmod u+w {dest})"
        ) from exc
    return dest


def check_reachable(url: str, timeout: float = 5.0, hint: str = "") -> None:
    """Open a TCP connection to `url`'s host with a short timeout; an OfflineError says what to do instead."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise OfflineError(
            f"cannot reach {host}:{port} for {url} ({exc.strerror or exc}); this machine appears to be offline "
            "or behind a firewall. Run the same `workbench download` on a machine with internet access and copy "
            f"the destination folder here, or pass --url-base with a mirror you can reach.{hint}"
        ) from exc


# --------------------------------------------------------------------------- HTTP transfers


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})


def get_json(url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0) -> Any:
    """GET and decode a JSON document, retrying transient failures; errors name the address."""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(_request(url), timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRYABLE_STATUS or attempt == retries:
                raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the address") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if attempt == retries:
                raise DownloadError(f"could not read {url}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise DownloadError(f"{url} did not return JSON ({exc}); check the address") from exc
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, remote: RemoteFile) -> str | None:
    """Check `path` against the size and checksum `remote` publishes; the check used, or ChecksumError."""
    actual_size = path.stat().st_size
    if remote.size is not None and actual_size != remote.size:
        raise ChecksumError(
            f"{remote.name} from {remote.url} is {actual_size} bytes, the source says {remote.size}; "
            "the partial file was removed, run the command again"
        )
    for algorithm, expected in (("sha256", remote.sha256), ("md5", remote.md5)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise ChecksumError(
                    f"{remote.name} from {remote.url} has {algorithm} {actual}, the source publishes {expected}; "
                    "the file was refused and removed. Run the command again; if it fails the same way the source "
                    "changed the file, so check the data set page and correct the registry entry"
                )
            return algorithm
    return "size" if remote.size is not None else None


class _Cut(Exception):
    """The connection ended before the whole body arrived."""


def _stream(
    url: str, part: Path, timeout: float, progress: bool, label: str, total_hint: int | None
) -> tuple[int, int | None]:
    """Append the rest of `url` to `part` (Range request when it holds bytes); (bytes now in part, total or None)."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(_request(url, headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset and total_hint == offset:
            return offset, total_hint  # the part already holds everything
        if exc.code == 416:
            part.unlink(missing_ok=True)  # the part is longer than the file: start again
            raise _Cut(f"range {offset}- not satisfiable") from exc
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: the body is the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else total_hint
        if total is not None:
            ensure_free_space(part.parent, total - offset, f"{label} (downloaded)")
        mode = "ab" if offset else "wb"
        with (
            open(part, mode) as handle,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
            ) as bar,
        ):
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as exc:
                    raise _Cut(str(exc)) from exc
                if not block:
                    break
                handle.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Cut(f"got {size} of {total} bytes")
    return size, total


def fetch_file(
    remote: RemoteFile,
    dest: Path,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch one file to DEST/remote.name through `.part`, resuming after cuts; verify, then rename.

    A file already present under its final name is checked and kept. A checksum mismatch removes the part
    file (resuming it would keep the bad bytes) and raises ChecksumError; running out of retries leaves the
    part file for the next run and raises DownloadError.
    """
    target = Path(dest) / remote.name
    part = target.with_name(target.name + ".part")
    record: dict[str, Any] = {"name": remote.name, "url": remote.url}
    if target.exists():
        record.update(size=target.stat().st_size, verified=verify(target, remote), status="present")
        return record
    target.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            _stream(remote.url, part, timeout, progress, remote.name, remote.size)
            break
        except _Cut as exc:
            last = exc
        except InsufficientSpaceError:
            raise  # retrying cannot help; the part file is kept for the next run
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRYABLE_STATUS:
                raise DownloadError(
                    f"{remote.url} answered HTTP {exc.code} {exc.reason} for {remote.name}; the address may have "
                    "moved: check the data set page and correct the registry entry or pass --url-base"
                ) from exc
            last = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    else:
        kept = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"gave up on {remote.name} from {remote.url} after {retries + 1} attempts ({last}); {kept} bytes are "
            f"kept in {part} and the next run resumes from there"
        )
    try:
        record["verified"] = verify(part, remote)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    record.update(size=target.stat().st_size, status="fetched")
    return record


# --------------------------------------------------------------------------- file lists of the sources


def _parse_checksum(value: str | None) -> tuple[str | None, str | None]:
    """'md5:<hex>' / 'sha256:<hex>' / bare hex (md5) -> (md5, sha256)."""
    if not value:
        return None, None
    algorithm, _, digest = value.rpartition(":")
    algorithm = algorithm.lower() or "md5"
    if algorithm not in ("md5", "sha256"):
        return None, None
    return (digest, None) if algorithm == "md5" else (None, digest)


def _with_pinned(files: list[RemoteFile], checksums: dict[str, str]) -> list[RemoteFile]:
    """Apply the registry's known checksums; a disagreement with what the source lists is refused."""
    out = []
    for remote in files:
        md5, sha256 = _parse_checksum(checksums.get(remote.name))
        if md5 and remote.md5 and md5.lower() != remote.md5.lower():
            raise ChecksumError(
                f"the source lists md5 {remote.md5} for {remote.name} ({remote.url}) but the registry expects "
                f"{md5}; the file was changed upstream: check the data set page and update the registry"
            )
        out.append(RemoteFile(remote.url, remote.name, remote.size, md5 or remote.md5, sha256 or remote.sha256))
    return out


def http_files(entry: Dataset, base: str) -> list[RemoteFile]:
    """The fixed file list of an http entry under `base`."""
    files = []
    for name in entry.files:
        md5, sha256 = _parse_checksum(entry.checksums.get(name))
        files.append(RemoteFile(f"{base.rstrip('/')}/{name.lstrip('/')}", Path(name).as_posix(), None, md5, sha256))
    return files


def zenodo_files(record: str, base: str, timeout: float = 30.0) -> list[RemoteFile]:
    """Files of Zenodo record `record` with sizes and md5 checksums, from `{base}/api/records/{record}`."""
    url = f"{base.rstrip('/')}/api/records/{record}"
    data = get_json(url, timeout=timeout)
    entries = data.get("files")
    if isinstance(entries, dict):  # some API versions nest the list under "entries"
        entries = entries.get("entries")
        entries = list(entries.values()) if isinstance(entries, dict) else entries
    if not entries:
        raise DownloadError(f"{url} lists no files; the record may be restricted or the id wrong")
    files = []
    for item in entries:
        name = item.get("key") or item.get("filename")
        link = (item.get("links") or {}).get("self") or (item.get("links") or {}).get("content")
        link = link or f"{base.rstrip('/')}/records/{record}/files/{urllib.parse.quote(name)}?download=1"
        md5, sha256 = _parse_checksum(item.get("checksum"))
        size = item.get("size") or item.get("filesize")
        files.append(RemoteFile(link, name, int(size) if size is not None else None, md5, sha256))
    return files


def gcs_files(bucket: str, prefixes: Iterable[str], base: str, timeout: float = 30.0) -> list[RemoteFile]:
    """Objects under `prefixes` of a public bucket, listed with the JSON API (paged), with sizes and md5."""
    base = base.rstrip("/")
    files = []
    for prefix in prefixes:
        token: str | None = None
        while True:
            query = {"prefix": prefix, "fields": "items(name,size,md5Hash),nextPageToken"}
            if token:
                query["pageToken"] = token
            url = f"{base}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            page = get_json(url, timeout=timeout)
            for item in page.get("items", []):
                name = item["name"]
                if name.endswith("/"):
                    continue
                md5 = base64.b64decode(item["md5Hash"]).hex() if item.get("md5Hash") else None
                files.append(
                    RemoteFile(f"{base}/{bucket}/{urllib.parse.quote(name)}", name, int(item["size"]), md5, None)
                )
            token = page.get("nextPageToken")
            if not token:
                break
        if not any(f.name.startswith(prefix) for f in files):
            raise DownloadError(f"gs://{bucket}/{prefix} lists no objects at {base}; check the registry entry")
    return files


# --------------------------------------------------------------------------- archives


def _is_archive(name: str) -> bool:
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz"))


def unpacked_bytes(archive: Path) -> int:
    """The bytes the members of a .zip or .tar archive take once unpacked (from its member table)."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                return sum(info.file_size for info in zipped.infolist())
        with tarfile.open(archive) as tarred:
            return sum(member.size for member in tarred.getmembers() if member.isfile())
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DownloadError(f"{archive} is not a readable archive ({exc}); delete it and download again") from exc


def extract_archive(archive: Path) -> Path:
    """Unpack `archive` into a sibling folder (its name without the suffix), atomically; the folder."""
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    target = archive.with_name(stem)
    if target.is_dir():
        return target
    sweep_leftovers(archive.parent, only=target.name)  # the partial folder of an interrupted extraction
    tmp = temp_name(target, ".partial")
    os.mkdir(tmp, 0o777)  # the user's normal permissions (umask), not mkdtemp's 0700
    try:
        ensure_free_space(archive.parent, unpacked_bytes(archive), f"the contents of {archive.name} (unpacked)")
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                root = tmp.resolve()
                for member in zipped.namelist():
                    if not (tmp / member).resolve().is_relative_to(root):
                        raise DownloadError(f"{archive} holds an unsafe path {member!r}; refusing to unpack it")
                zipped.extractall(tmp)
        else:
            with tarfile.open(archive) as tarred:
                tarred.extractall(tmp, filter="data")
        # an archive holding one folder of its own name unpacks to that folder, not <stem>/<stem>
        inner = list(tmp.iterdir())
        source = inner[0] if len(inner) == 1 and inner[0].is_dir() and inner[0].name == stem else tmp
        os.replace(source, target)
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DownloadError(f"{archive} is not a readable archive ({exc}); delete it and download again") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- the command


@dataclass
class DownloadResult:
    """What `download` did: the destination, the manifest and the per-file records."""

    dataset: str
    dest: Path
    manifest: Path
    files: list[dict[str, Any]]
    next_command: str


def _hf_download(entry: Dataset, dest: Path, endpoint: str, progress: bool) -> list[dict[str, Any]]:
    """snapshot_download of the entry's repository into DEST (resumable and checked by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    assert entry.repo_id is not None
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # an explicit download lifts, for its duration, the offline switch that model building sets by default
    import huggingface_hub.constants as hub_constants

    was_offline, env_offline = hub_constants.HF_HUB_OFFLINE, os.environ.pop("HF_HUB_OFFLINE", None)
    hub_constants.HF_HUB_OFFLINE = False
    try:
        snapshot_download(
            repo_id=entry.repo_id,
            repo_type="dataset",
            local_dir=str(dest),
            endpoint=endpoint,
            allow_patterns=list(entry.allow_patterns) or None,
        )
    except Exception as exc:  # huggingface_hub raises many types; all end the same way for the user
        raise DownloadError(
            f"Hugging Face download of {entry.repo_id} from {endpoint} into {dest} failed: {exc}. Run the command "
            "again to resume; if the repository is gated, accept its terms on the page and set HF_TOKEN"
        ) from exc
    finally:
        hub_constants.HF_HUB_OFFLINE = was_offline
        if env_offline is not None:
            os.environ["HF_HUB_OFFLINE"] = env_offline
    records = []
    for path in sorted(dest.rglob("*")):
        if path.is_file() and ".cache" not in path.relative_to(dest).parts and path.name != MANIFEST:
            name = path.relative_to(dest).as_posix()
            records.append(
                {
                    "name": name,
                    "url": f"{endpoint}/datasets/{entry.repo_id}/resolve/main/{name}",
                    "size": path.stat().st_size,
                    "verified": "huggingface_hub",
                    "status": "fetched",
                }
            )
    return records


def download(
    name: str,
    dest: Path,
    url_base: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
    extract: bool = True,
    progress: bool = True,
    hf_download: Callable[[Dataset, Path, str, bool], list[dict[str, Any]]] | None = None,
) -> DownloadResult:
    """Fetch data set `name` into `dest` and write its manifest; see the module docstring for the guarantees.

    `url_base` replaces the entry's base address (a mirror, the Hub endpoint, or a local server in tests);
    for Hub entries HF_ENDPOINT is honoured when `url_base` is not given. `hf_download` replaces the Hub
    transfer (tests).
    """
    entry = get_dataset(name)
    dest = Path(dest)
    if entry.kind == "manual":
        steps = entry.notes.replace("DEST", str(dest))
        raise ManualDownloadError(
            f"{entry.title} cannot be fetched by script. {steps} Page: {entry.base_url} (see also {entry.page}). "
            f"Then run: {ingest_hint(entry, dest)}"
        )
    check_writable(dest)
    default = os.environ.get("HF_ENDPOINT") if entry.kind == "hf" else None
    base = (url_base or default or entry.base_url).rstrip("/")
    hint = f" Then run: {ingest_hint(entry, dest)}"
    check_reachable(base, timeout=connect_timeout, hint=hint)
    if entry.kind == "hf":
        records = (hf_download or _hf_download)(entry, dest, base, progress)
    else:
        if entry.kind == "zenodo":
            assert entry.record is not None
            files = zenodo_files(entry.record, base, timeout=timeout)
        elif entry.kind == "gcs":
            assert entry.bucket is not None
            files = gcs_files(entry.bucket, entry.prefixes, base, timeout=timeout)
        else:
            files = http_files(entry, base)
        files = _with_pinned(files, entry.checksums)
        records = []
        for remote in files:
            record = fetch_file(remote, dest, retries=retries, backoff=backoff, timeout=timeout, progress=progress)
            if extract and entry.extract and _is_archive(remote.name):
                record["extracted_to"] = extract_archive(dest / remote.name).relative_to(dest).as_posix()
            records.append(record)
    manifest = write_json_atomic(
        dest / MANIFEST,
        {
            "dataset": entry.name,
            "title": entry.title,
            "kind": entry.kind,
            "source": entry.source if url_base is None else f"{entry.source}, through {base}",
            "licence": entry.licence,
            "citation": entry.citation,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": records,
            "next": ingest_hint(entry, dest),
            "entry": {key: value for key, value in asdict(entry).items() if value not in ((), {}, None, "")},
        },
    )
    return DownloadResult(entry.name, dest, manifest, records, ingest_hint(entry, dest))
