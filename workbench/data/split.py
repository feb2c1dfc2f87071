"""Spatially disjoint train / val / test splits and spatial cross-validation folds.

Chips that lie close together share terrain, lakes and even pixels, so a random split leaks
information from train into test. Here whole geographic blocks go to one split, and chips near
a block edge become "buffer" (used by no split), following the CryoSentinel block rule:

* ``lat_idx = floor(lat / s)``, ``lon_idx = floor(lon / s)`` (float64, Python floor);
* ``fl = (lat / s) % 1``, ``fo = (lon / s) % 1``, ``d_lat = min(fl, 1 - fl) * s``, ``d_lon = min(fo, 1 - fo) * s``;
  buffer when ``d_lat < b`` or ``d_lon < b``;
* ``bucket = int(sha1(f"{salt}|{lat_idx}|{lon_idx}").hexdigest()[:8], 16) % 100``;
  train below ``train_percent``, val below ``train_percent + val_percent``, test otherwise.

The split depends only on the coordinates and the salt, never on the training seed, so the same
location lands in the same split in every year and every experiment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from workbench.params import SplitConfig

SPLITS = ("train", "val", "test")
BUFFER = "buffer"
EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "buffer": BUFFER,
}


class SplitError(ValueError):
    """Chips cannot be split as requested; the message says which split and what to change."""


def _coordinates(lat: Sequence[float] | np.ndarray, lon: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lat_arr = np.asarray(lat, dtype=np.float64).ravel()
    lon_arr = np.asarray(lon, dtype=np.float64).ravel()
    if lat_arr.shape != lon_arr.shape:
        raise SplitError(f"lat and lon must have the same length, got {lat_arr.size} and {lon_arr.size}")
    missing = ~(np.isfinite(lat_arr) & np.isfinite(lon_arr))
    if missing.any():
        raise SplitError(
            f"{int(missing.sum())} of {lat_arr.size} chips have no finite lat/lon; spatial splits need coordinates "
            "(use split.method=catalog to keep the source's own split)"
        )
    return lat_arr, lon_arr


def block_indices(lat: np.ndarray, lon: np.ndarray, block_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer block row/column of each point: ``floor(coord / block_deg)`` in float64."""
    if not block_deg > 0:
        raise SplitError(f"block_deg must be positive, got {block_deg}")
    lat_arr, lon_arr = _coordinates(lat, lon)
    return np.floor(lat_arr / block_deg).astype(np.int64), np.floor(lon_arr / block_deg).astype(np.int64)


def near_block_edge(lat: np.ndarray, lon: np.ndarray, block_deg: float, buffer_deg: float) -> np.ndarray:
    """True where a point lies closer than `buffer_deg` (degrees) to any edge of its block."""
    lat_arr, lon_arr = _coordinates(lat, lon)
    frac_lat = np.remainder(lat_arr / block_deg, 1.0)  # same semantics as Python's float %
    frac_lon = np.remainder(lon_arr / block_deg, 1.0)
    d_lat = np.minimum(frac_lat, 1.0 - frac_lat) * block_deg
    d_lon = np.minimum(frac_lon, 1.0 - frac_lon) * block_deg
    result: np.ndarray = (d_lat < buffer_deg) | (d_lon < buffer_deg)
    return result


def _block_hash(salt: str, lat_idx: int, lon_idx: int) -> int:
    key = f"{salt}|{lat_idx}|{lon_idx}".encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16)


def block_hashes(lat_idx: np.ndarray, lon_idx: np.ndarray, salt: str) -> np.ndarray:
    """The 32-bit block hash of each point, computed once per distinct block."""
    pairs = np.stack([np.asarray(lat_idx, dtype=np.int64), np.asarray(lon_idx, dtype=np.int64)], axis=1)
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    hashes = np.array([_block_hash(salt, int(a), int(b)) for a, b in unique], dtype=np.int64)
    result: np.ndarray = hashes[inverse.ravel()]
    return result


def _check_percents(train_percent: int, val_percent: int) -> None:
    if not (0 <= train_percent <= 100 and 0 <= val_percent <= 100 and train_percent + val_percent <= 100):
        raise SplitError(
            f"train_percent={train_percent} and val_percent={val_percent} must be in 0..100 and sum to at most 100"
        )


def _buckets_to_splits(buckets: np.ndarray, train_percent: int, val_percent: int) -> np.ndarray:
    out = np.full(buckets.shape, "test", dtype=object)
    out[buckets < train_percent + val_percent] = "val"
    out[buckets < train_percent] = "train"
    return out


def block_split(
    lat: Sequence[float] | np.ndarray,
    lon: Sequence[float] | np.ndarray,
    block_deg: float = 0.15,
    buffer_deg: float = 0.02,
    salt: str = "cryosentinel-blocks-v1",
    train_percent: int = 80,
    val_percent: int = 10,
) -> np.ndarray:
    """Split name ("train"/"val"/"test"/"buffer") of each point by the CryoSentinel block rule.

    With uniform points, the expected buffer share is ``1 - (1 - 2 b / s)^2`` (0.4622 at s=0.15, b=0.02).
    """
    _check_percents(train_percent, val_percent)
    lat_arr, lon_arr = _coordinates(lat, lon)
    lat_idx, lon_idx = block_indices(lat_arr, lon_arr, block_deg)
    buckets = block_hashes(lat_idx, lon_idx, salt) % 100
    out = _buckets_to_splits(buckets, train_percent, val_percent)
    out[near_block_edge(lat_arr, lon_arr, block_deg, buffer_deg)] = BUFFER
    return out.astype(str)


def spatial_kfold(
    lat: Sequence[float] | np.ndarray,
    lon: Sequence[float] | np.ndarray,
    n_folds: int = 5,
    block_deg: float = 0.15,
    salt: str = "cryosentinel-blocks-v1",
) -> np.ndarray:
    """Fold number (0..n_folds-1) of each point; all points of one block share a fold.

    Blocks are ordered by their hash and dealt to folds in turn, so folds hold nearly equal numbers
    of blocks (a plain ``hash % n_folds`` can leave a fold empty when there are few blocks).
    Used for out-of-sample predictions over the whole data set (label-noise review).
    """
    if n_folds < 2:
        raise SplitError(f"n_folds must be at least 2, got {n_folds}")
    lat_idx, lon_idx = block_indices(np.asarray(lat), np.asarray(lon), block_deg)
    if lat_idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.stack([lat_idx, lon_idx], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    if len(unique) < n_folds:
        raise SplitError(
            f"only {len(unique)} spatial blocks of {block_deg} degrees for {n_folds} folds; lower block_deg or n_folds"
        )
    hashes = np.array([_block_hash(salt, int(a), int(b)) for a, b in unique], dtype=np.int64)
    order = np.lexsort((np.arange(len(hashes)), hashes))
    block_fold = np.empty(len(unique), dtype=np.int64)
    block_fold[order] = np.arange(len(unique)) % n_folds
    result: np.ndarray = block_fold[inverse.ravel()]
    return result


def region_holdout(regions: Sequence[str] | np.ndarray | pd.Series, holdout: Sequence[str]) -> np.ndarray:
    """ "test" for chips of the held-out regions, "train" for all others."""
    region_arr = np.asarray(regions, dtype=object).astype(str)
    if not holdout:
        raise SplitError("split.method=region needs split.holdout_regions (the regions used as test)")
    known = sorted(set(region_arr.tolist()))
    unknown = [name for name in holdout if name not in known]
    if unknown:
        raise SplitError(f"holdout regions {unknown} are not in the catalog; its regions are {known}")
    return np.where(np.isin(region_arr, list(holdout)), "test", "train").astype(str)


def _require_nonempty(splits: np.ndarray, expected: Sequence[str], hint: str) -> None:
    counts = {name: int((splits == name).sum()) for name in SPLITS}
    for name in expected:
        if counts[name] == 0:
            raise SplitError(
                f"the {name} split is empty (counts: {counts}, buffer: {int((splits == BUFFER).sum())}); {hint}"
            )


def _catalog_column(catalog: pd.DataFrame, column: str) -> np.ndarray:
    if column not in catalog.columns:
        raise SplitError(f"the catalog has no {column!r} column (columns: {list(catalog.columns)})")
    return catalog[column].to_numpy()


def _catalog_splits(catalog: pd.DataFrame) -> np.ndarray:
    if "split" not in catalog.columns:
        raise SplitError("split.method=catalog needs a 'split' column in the catalog; use method=block or region")
    raw = catalog["split"].fillna("").astype(str).str.strip().str.lower()
    if (raw == "").all():
        raise SplitError("split.method=catalog but the catalog's 'split' column is empty; use method=block or region")
    unknown = sorted(set(raw) - set(_SPLIT_ALIASES))
    if unknown:
        raise SplitError(
            f"the catalog's 'split' column holds unknown values {unknown}; expected one of {sorted(_SPLIT_ALIASES)}"
        )
    return raw.map(_SPLIT_ALIASES).to_numpy().astype(str)


def has_coordinates(catalog: pd.DataFrame) -> bool:
    """Whether every chip of the catalog has a finite lat/lon (what maps, block splits and leakage need)."""
    if not {"lat", "lon"} <= set(catalog.columns) or not len(catalog):
        return False
    lat = pd.to_numeric(catalog["lat"], errors="coerce").to_numpy(dtype=np.float64)
    lon = pd.to_numeric(catalog["lon"], errors="coerce").to_numpy(dtype=np.float64)
    return bool(np.isfinite(lat).all() and np.isfinite(lon).all())


def _share_counts(n: int, cfg: SplitConfig) -> tuple[int, int]:
    """Numbers of train and val items out of `n` for the configured percentages (rounded, at least one
    of each non-zero share when there are enough items)."""
    n_train = round(n * cfg.train_percent / 100)
    n_val = round(n * cfg.val_percent / 100)
    n_test = n - n_train - n_val
    wanted = [share > 0 for share in _shares(cfg)]
    counts = [n_train, n_val, n_test]
    for index in (1, 2, 0):  # lift an empty non-zero share from the largest one when possible
        if wanted[index] and counts[index] == 0 and n >= sum(wanted):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[index] += 1
    return counts[0], counts[1]


def random_split(n: int, cfg: SplitConfig) -> np.ndarray:
    """train / val / test for `n` chips by a permutation drawn from `cfg.seed`, in exact proportions.

    Needs no coordinates. Neighbouring chips may land in different splits, so scores can be optimistic
    when chips overlap or touch: prefer method=source or rows for tiles of one scene.
    """
    n_train, n_val = _share_counts(n, cfg)
    order = np.random.default_rng(cfg.seed).permutation(n)
    out = np.full(n, "test", dtype=object)
    out[order[:n_train]] = "train"
    out[order[n_train : n_train + n_val]] = "val"
    return out.astype(str)


def _groups(catalog: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    column = cfg.group_column
    if column not in catalog.columns:
        raise SplitError(
            f"split.method={cfg.method} groups chips by the catalog column {column!r}, which the catalog lacks "
            f"(columns: {list(catalog.columns)}); set split.group_column"
        )
    return catalog[column].fillna("").astype(str).to_numpy()


def source_split(catalog: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Whole scenes (or source files, `cfg.group_column`) to one split each, in a seeded order.

    Groups are shuffled with `cfg.seed` and dealt to train until it holds `train_percent` of the chips,
    then to val, then to test; each split gets at least one group when there are three.
    """
    groups = _groups(catalog, cfg)
    names, counts = np.unique(groups, return_counts=True)
    order = np.random.default_rng(cfg.seed).permutation(len(names))
    train_share, val_share, test_share = _shares(cfg)
    reserve_val, reserve_test = int(val_share > 0), int(test_share > 0)
    total, seen = int(counts.sum()), 0
    assignment: dict[str, str] = {}
    current = "train"
    for rank, index in enumerate(order):
        left = len(names) - rank  # groups not yet assigned, this one included
        if (
            current == "train"
            and assignment
            and (100 * seen >= train_share * total or left <= reserve_val + reserve_test)
        ):
            current = "val" if val_share > 0 else "test"
        if (
            current == "val"
            and "val" in assignment.values()
            and (100 * seen >= (train_share + val_share) * total or left <= reserve_test)
        ):
            current = "test"
        assignment[str(names[index])] = current
        seen += int(counts[index])
    return np.array([assignment[g] for g in groups], dtype=str)


def row_band_split(catalog: pd.DataFrame, cfg: SplitConfig, chip_size: int) -> np.ndarray:
    """Contiguous row bands of each scene: the top `train_percent` of its rows train, then val, then test.

    A chip belongs to a band when all its pixel rows lie inside it, at least `cfg.buffer_px` rows from the
    next band; chips straddling a boundary or its buffer become "buffer". Rows come from the catalog's
    `row` column (the chip's top pixel row in its scene, written by ingest when a scene is tiled).
    """
    if "row" not in catalog.columns:
        raise SplitError(
            "split.method=rows needs the catalog column 'row' (a chip's top row within its scene); re-ingest the "
            "scene with --chip-size so it is tiled, or use split.method=random"
        )
    groups = _groups(catalog, cfg)
    rows = pd.to_numeric(catalog["row"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
    out = np.full(len(catalog), BUFFER, dtype=object)
    buffer = cfg.buffer_px
    for group in np.unique(groups):
        members = groups == group
        top = rows[members]
        height = int(top.max()) + chip_size
        first = height * cfg.train_percent / 100
        second = height * (cfg.train_percent + cfg.val_percent) / 100
        bottom = top + chip_size
        split = np.full(top.shape, BUFFER, dtype=object)
        split[bottom + buffer / 2 <= first] = "train"
        split[(top - buffer / 2 >= first) & (bottom + buffer / 2 <= second)] = "val"
        split[top - buffer / 2 >= second] = "test"
        out[members] = split
    return out.astype(str)


def carve_missing_splits(catalog: pd.DataFrame, splits: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Fill a val or test split the data set does not provide (38-Cloud has no val, a Landslide4Sense
    download may hold only TrainData) from its train chips, whole `cfg.group_column` groups at a time
    when there are enough of them, else chip by chip, in a seeded order.

    The share taken is the missing split's percentage of train + missing (e.g. val_percent 10 and
    train_percent 80: one ninth of the train chips).
    """
    splits = np.asarray(splits, dtype=object).copy()
    for name, share in (("val", cfg.val_percent), ("test", 100 - cfg.train_percent - cfg.val_percent)):
        if share <= 0 or (splits == name).any():
            continue
        train = np.flatnonzero(splits == "train")
        if len(train) < 2:
            continue
        part = SplitConfig(
            method="random",
            seed=cfg.seed,
            train_percent=100 - round(100 * share / (cfg.train_percent + share)),
            val_percent=0,
        )
        sub = catalog.iloc[train]
        grouped = cfg.group_column in sub.columns and sub[cfg.group_column].nunique() >= 4
        if grouped:
            chosen = source_split(sub, part.model_copy(update={"method": "source", "group_column": cfg.group_column}))
        else:
            chosen = random_split(len(train), part)
        splits[train[chosen == "test"]] = name
    return splits.astype(str)


def assign_splits(catalog: pd.DataFrame, cfg: SplitConfig, seed: int = 0, chip_size: int | None = None) -> pd.Series:
    """Split of every catalog row according to `cfg` (index aligned with `catalog`, name "split").

    method=block: `block_split` on lat/lon. method=region: chips of `cfg.holdout_regions` are test,
    the others are split into train/val by block hash (with edge buffers) in the proportion
    train_percent:val_percent. method=catalog: the catalog's own split column. Without coordinates:
    method=random (`random_split`), source (`source_split`) and rows (`row_band_split`, needs
    `chip_size`).
    `seed` is accepted for a uniform call signature but not used: splits are a pure function of the
    coordinates, `cfg.salt` and `cfg.seed`, so changing the training seed never moves a chip between splits.
    """
    del seed
    _check_percents(cfg.train_percent, cfg.val_percent)
    expected_shares = [name for name, share in zip(SPLITS, _shares(cfg)) if share > 0]
    if cfg.method == "random":
        splits = random_split(len(catalog), cfg)
        _require_nonempty(splits, expected_shares, "add chips or change split.train_percent / val_percent")
        return pd.Series(splits, index=catalog.index, name="split", dtype=object)
    if cfg.method == "source":
        splits = source_split(catalog, cfg)
        _require_nonempty(
            splits, expected_shares, f"split.method=source needs at least three distinct {cfg.group_column!r} values"
        )
        return pd.Series(splits, index=catalog.index, name="split", dtype=object)
    if cfg.method == "rows":
        if chip_size is None:
            raise SplitError("split.method=rows needs the chip size of the store")
        splits = row_band_split(catalog, cfg, chip_size)
        _require_nonempty(
            splits, expected_shares, "lower split.buffer_px, use a smaller --chip-size at ingest, or use method=random"
        )
        return pd.Series(splits, index=catalog.index, name="split", dtype=object)
    if cfg.method in ("block", "region") and not has_coordinates(catalog):
        raise SplitError(
            f"split.method={cfg.method} needs finite lat/lon for every chip, and this store has none; use "
            "split.method=catalog (the data set's own split), source (whole scenes), rows (row bands of a scene) "
            "or random"
        )
    block_hint = "change split.block_deg, split.salt or split.train_percent / split.val_percent"
    if cfg.method == "block":
        splits = block_split(
            _catalog_column(catalog, "lat"),
            _catalog_column(catalog, "lon"),
            block_deg=cfg.block_deg,
            buffer_deg=cfg.buffer_deg,
            salt=cfg.salt,
            train_percent=cfg.train_percent,
            val_percent=cfg.val_percent,
        )
        expected = [name for name, share in zip(SPLITS, _shares(cfg)) if share > 0]
        _require_nonempty(splits, expected, block_hint)
    elif cfg.method == "region":
        splits = region_holdout(_catalog_column(catalog, "region"), cfg.holdout_regions).astype(object)
        rest = splits == "train"
        total = cfg.train_percent + cfg.val_percent
        if total == 0:
            raise SplitError("split.method=region needs train_percent + val_percent > 0 for the non-held-out regions")
        train_share = round(100 * cfg.train_percent / total)
        splits[rest] = block_split(
            _catalog_column(catalog, "lat")[rest],
            _catalog_column(catalog, "lon")[rest],
            block_deg=cfg.block_deg,
            buffer_deg=cfg.buffer_deg,
            salt=cfg.salt,
            train_percent=train_share,
            val_percent=100 - train_share,
        )
        expected = ["test", "train"] + (["val"] if cfg.val_percent > 0 else [])
        _require_nonempty(splits, expected, block_hint + " or split.holdout_regions")
    else:
        splits = _catalog_splits(catalog)
        _require_nonempty(splits, ["train"], "the catalog's split column must name some chips 'train'")
        splits = carve_missing_splits(catalog, splits, cfg)
    return pd.Series(splits, index=catalog.index, name="split", dtype=object)


def _shares(cfg: SplitConfig) -> tuple[int, int, int]:
    return cfg.train_percent, cfg.val_percent, 100 - cfg.train_percent - cfg.val_percent


def _unit_radians(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.radians(np.stack([lat, lon], axis=1).astype(np.float64))


def leakage_report(catalog: pd.DataFrame, split_column: str = "split") -> pd.DataFrame:
    """Minimum great-circle distance (km) between chips of every pair of different splits.

    One row per pair (buffer chips are ignored): split_a, split_b, n_a, n_b, min_distance_km.
    A small distance means two splits hold neighbouring chips and test scores may be optimistic.
    """
    from sklearn.neighbors import BallTree

    lat, lon = _coordinates(_catalog_column(catalog, "lat"), _catalog_column(catalog, "lon"))
    splits = _catalog_column(catalog, split_column).astype(str)
    names = [name for name in dict.fromkeys(splits.tolist()) if name != BUFFER and name != ""]
    order = {name: i for i, name in enumerate([*SPLITS, *sorted(set(names) - set(SPLITS))])}
    names.sort(key=lambda name: order[name])
    rows = []
    for name_a, name_b in combinations(names, 2):
        points_a = _unit_radians(lat[splits == name_a], lon[splits == name_a])
        points_b = _unit_radians(lat[splits == name_b], lon[splits == name_b])
        tree = BallTree(points_b, metric="haversine")
        distance, _ = tree.query(points_a, k=1)
        rows.append(
            {
                "split_a": name_a,
                "split_b": name_b,
                "n_a": len(points_a),
                "n_b": len(points_b),
                "min_distance_km": float(distance.min() * EARTH_RADIUS_KM),
            }
        )
    return pd.DataFrame(rows, columns=["split_a", "split_b", "n_a", "n_b", "min_distance_km"])
