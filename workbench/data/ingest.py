"""Ingest an external Earth-observation data set into a chip store.

>>> report = ingest("landslide4sense", Path("Landslide4Sense"), Path("data-cache/l4s"))  # doctest: +SKIP
>>> report.n_chips, report.unpaired[:1]                                                   # doctest: +SKIP

The store is written into a temporary folder and renamed when complete, so a failure never leaves a
half-written store. Chips without a single valid pixel are skipped and listed in the report (and in the
store's attributes); files a reader could not pair are listed too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

from workbench.data.sources import Source
from workbench.data.sources.cloud38 import read_cloud38
from workbench.data.sources.cryosentinel import read_cryosentinel
from workbench.data.sources.geotiff import read_geotiff
from workbench.data.sources.landslide4sense import read_landslide4sense
from workbench.data.sources.npz import read_npz, read_ukis_csmask
from workbench.data.sources.sen1floods11 import read_sen1floods11
from workbench.data.sources.terramesh import read_terramesh
from workbench.data.sources.vector import read_vector
from workbench.data.store import Chip, StoreWriter
from workbench.params import IngestConfig, SplitConfig

Reader = Callable[..., Source]

FORMATS: dict[str, Reader] = {
    "landslide4sense": read_landslide4sense,
    "cloud38": read_cloud38,
    "sen1floods11": read_sen1floods11,
    "terramesh": read_terramesh,
    "cryosentinel": read_cryosentinel,
    "npz": read_npz,
    "ukis-csmask": read_ukis_csmask,
    "geotiff": read_geotiff,
    "vector": read_vector,
}


class UnknownFormatError(ValueError):
    """The requested input format has no reader."""


@dataclass
class IngestReport:
    """What an ingest wrote and what it left out."""

    n_chips: int
    dest: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (chip id, reason naming its file)
    unpaired: list[str] = field(default_factory=list)  # files without their partner, with the reason
    format: str = ""

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"{self.n_chips} chips from {self.format} written to {self.dest}; "
            f"{len(self.skipped)} skipped (no valid pixel), {len(self.unpaired)} unpaired file(s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["dest"] = str(self.dest)
        data["skipped"] = [list(item) for item in self.skipped]
        return data


def get_reader(format: str) -> Reader:
    """The reader for a format name, or an error listing the valid names."""
    try:
        return FORMATS[format]
    except KeyError:
        raise UnknownFormatError(f"unknown format {format!r}; valid formats: {', '.join(sorted(FORMATS))}") from None


def reader_options(format: str) -> dict[str, Any]:
    """The options a format accepts (beyond src, chip_size and stride) with their defaults."""
    parameters = inspect.signature(get_reader(format)).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("src", "chip_size", "stride")}


def check_options(format: str, options: dict[str, Any]) -> None:
    """Raise when an option is not one the format's reader accepts, listing the accepted ones."""
    accepted = reader_options(format)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"format {format!r} has no option(s) {unknown}; accepted: {sorted(accepted) or 'none'}")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` from the command line, the value parsed as YAML (so 3, true, [a, b], {4: 1} keep their types)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"an option must look like key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """Several `key=value` options as a dict."""
    return dict(parse_option(item) for item in items)


def skip_reason(chip: Chip) -> str | None:
    """Why a chip cannot be stored (no valid pixel), naming the file it came from; None when it is fine."""
    if np.asarray(chip.valid, dtype=bool).any():
        return None
    origin = chip.extra.get("file", "?")
    return f"{origin}: chip {chip.chip_id!r} has no valid pixel (every pixel is nodata: NaN/Inf or a fill value)"


def ingest(
    format: str,
    src: Path,
    dest: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split: str | None = None,
    split_options: dict[str, Any] | None = None,
    **options: Any,
) -> IngestReport:
    """Read `src` in the given format and write its chips to a new store at `dest`.

    `chip_size`/`stride` tile rasters larger than a chip (default: one chip per file, stride = chip_size).
    `options` are the reader's keyword options (see `reader_options(format)`); values may be the
    YAML-parsed strings of `--option key=value`. `split` (a `data.split.method`, e.g. random, source or
    rows, with `split_options` such as train_percent or buffer_px) writes the catalog's split column
    at ingest, so recipes can keep it with `split.method: catalog`.
    """
    reader = get_reader(format)
    check_options(format, options)
    split_cfg = ingest_split_config(split, split_options)
    src, dest = Path(src), Path(dest)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; expected the {format} data")
    if stride is not None and chip_size is None:
        raise ValueError("a stride needs a chip_size")
    source = reader(src, chip_size=chip_size, stride=stride, **options)
    skipped: list[tuple[str, str]] = []
    attrs = {"format": format, "src": str(src), "chip_size": chip_size, "stride": stride, **source.attrs}
    with StoreWriter(dest, source.bands, source=format, attrs=attrs, overwrite=overwrite) as writer:
        chips = tqdm(source.chips, total=source.total, desc=f"ingest {format}", unit="chip", disable=not progress)
        written = 0
        for chip in chips:
            reason = skip_reason(chip)
            if reason is not None:
                skipped.append((chip.chip_id, reason))
                continue
            writer.append(chip)
            written += 1
        if written == 0:
            reasons = [reason for _, reason in skipped[:3]] + source.unpaired[:3]
            raise ValueError(f"no chip of {src} could be stored: {reasons}")
        writer.attrs.update({"skipped": [list(item) for item in skipped], "unpaired": list(source.unpaired)})
        if split_cfg is not None:
            writer.attrs["split"] = split_cfg.model_dump(mode="json")
    if split_cfg is not None:
        write_split(dest, split_cfg)
    return IngestReport(written, dest, skipped, list(source.unpaired), format)


def ingest_split_config(method: str | None, options: dict[str, Any] | None = None) -> SplitConfig | None:
    """The split to write at ingest (None: keep the reader's), validated like `data.split`."""
    if method is None:
        if options:
            raise ValueError(f"split options {sorted(options)} need a split method (--split random|source|rows|...)")
        return None
    try:
        return SplitConfig.model_validate({"method": method, **(options or {})})
    except ValidationError as exc:
        raise ValueError(f"invalid ingest split {method!r} {options or {}}: {exc}") from None


def write_split(store: Path, cfg: SplitConfig) -> None:
    """Assign `cfg`'s split to every chip of `store` and rewrite its catalog (atomically)."""
    from workbench.data.split import assign_splits
    from workbench.data.store import read_catalog, read_store_meta
    from workbench.io import write_parquet_atomic

    catalog = read_catalog(store)
    chip_size = int(read_store_meta(store)["chip_size"][0])
    catalog["split"] = assign_splits(catalog, cfg, chip_size=chip_size).to_numpy()
    write_parquet_atomic(Path(store) / "catalog.parquet", catalog)


PATH_OPTIONS = ("labels", "images")  # reader options that name files, taken from the project root


def _rooted(value: Any, root: Path) -> Any:
    """A relative path (or each of a list of them) joined to `root`; other values unchanged."""
    if isinstance(value, str | Path):
        return str(value) if Path(value).is_absolute() else str(root / value)
    if isinstance(value, list | tuple):
        return [_rooted(item, root) for item in value]
    return value


def ensure_ingested(cfg: IngestConfig, store: Path, root: Path | None = None, progress: bool = True) -> Path:
    """The store at `store`, ingested from `cfg` (data.ingest) when it does not exist yet.

    An existing store is reused when it records the same format, source and tiling; otherwise the run
    stops with the difference and the fix, so a parameter change never reads chips of other data.
    """
    from workbench.data.store import read_store_meta

    base = Path.cwd() if root is None else Path(root)
    src = cfg.src if cfg.src.is_absolute() else (base / cfg.src)
    wanted = {"format": cfg.format, "src": str(src.resolve()), "chip_size": cfg.chip_size, "stride": cfg.stride}
    if (Path(store) / "catalog.parquet").is_file():
        attrs = read_store_meta(store).get("attrs", {})
        found = {key: attrs.get(key) for key in wanted}
        if found["src"] is not None:
            found["src"] = str(Path(found["src"]).resolve())
        if found != wanted:
            changed = {key: (found[key], wanted[key]) for key in wanted if found[key] != wanted[key]}
            raise ValueError(
                f"store {store} was ingested from other data than data.ingest asks for ({changed}, as "
                "(store, parameters)); point data.store at a new folder or delete the old store"
            )
        return Path(store)
    if not src.exists():
        raise FileNotFoundError(
            f"data.ingest.src {src} does not exist; download the data there or set data.ingest.src (a path from "
            "the project root or an absolute one)"
        )
    options = {key: _rooted(value, base) if key in PATH_OPTIONS else value for key, value in cfg.options.items()}
    ingest(
        cfg.format,
        src.resolve(),
        Path(store),
        chip_size=cfg.chip_size,
        stride=cfg.stride,
        progress=progress,
        split=cfg.split,
        split_options=cfg.split_options or None,
        **options,
    )
    return Path(store)
