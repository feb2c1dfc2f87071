"""Deterministic multimodal glacial-lake chips: the workbench's embedded demo data.

Each chip is a small mountain scene at 10 m pixels with the 15 input bands of the CryoSentinel use case
(12 Sentinel-2 L2A bands, Sentinel-1 VV/VH in dB, a Copernicus-like DEM in metres) and a binary lake label.
The physics is simplified but consistent, so a model has to combine modalities the way it would on real data:

* Terrain is a smooth surface (3,000-4,500 m) of ramps, bumps and low-frequency noise. Lakes sit in carved
  depressions with a flat surface at the level of their lowest shore pixel; lake extent varies a little by year.
* Land cover follows the terrain: snow/ice on high ground and north-facing slopes, alpine meadow on low
  ground, bare rock/debris elsewhere, water in the lakes. Each class has a reflectance spectrum with the
  well-known signatures (water dark in NIR/SWIR, snow bright in the visible but dark in SWIR, vegetation with
  a red edge, rock rising into SWIR), varied per site, per chip and per pixel.
* Illumination: direct sunlight follows the slope; shadows (cloud shadows, shadowed slopes) keep only the
  blue-rich diffuse skylight, which pushes MNDWI above 0 - shadows look like water to the index. Clouds are
  bright in every optical band. SAR and DEM are unaffected by clouds and shadows.
* SAR: calm water is dark (VV ~ -22 dB), rock bright with a slope (local incidence) term, wet snow dark-ish;
  multiplicative gamma speckle is applied in linear power before conversion to dB.
* Snow is an MNDWI confuser, shadows are optical confusers and wet snow a SAR confuser; only the
  combination of optical, SAR and DEM separates all of them from lakes.

With `SyntheticConfig.multiclass` the label has three classes (`MULTICLASS_CLASSES`: 0 other, 1 lake,
2 snow_ice from the snow and ice surface) and pixels under a cloud are unlabelled (`IGNORE_INDEX`: an
annotator sees no ground there); the images, the plan and the random streams are those of the binary
store, so its images are byte-identical and only the label planes differ.

A fraction of lake chips gets a corrupted label (a lake omitted, undersized or the label shifted) so that
label-noise audits can be scored; the clean label is stored as the extra plane ``clean_label``. The planes
``surface`` (see `SURFACE_CLASSES`) and ``illumination`` (see `ILLUMINATION_CLASSES`) record the simulated
ground truth for error analysis. A few chips carry a stripe of Sentinel-2 nodata (all 12 bands 0).

Same `SyntheticConfig` (including its seed) -> byte-identical stores: the plan comes from one random stream,
each site and each chip from its own `numpy.random.SeedSequence` stream keyed by its index.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.data.store import BandSpec, Chip, StoreWriter, positive_fraction, read_store_meta
from workbench.functional import confusion_counts, iou_score
from workbench.params import SplitConfig, SyntheticConfig

GENERATOR_VERSION = 2  # 2: catalog records each chip's CRS (UTM zone) and bounds
PIXEL_SIZE_M = 10.0  # the chips imitate Sentinel-2's 10 m bands
SOURCE = "synthetic"

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
S1_BANDS = ["VV", "VH"]
S2_MAX = 16000.0

SURFACE_CLASSES = {"rock": 0, "vegetation": 1, "snow": 2, "water": 3}
ILLUMINATION_CLASSES = {"sunlit": 0, "cloud": 1, "cloud_shadow": 2, "terrain_shadow": 3}
NOISE_KINDS = ("omitted", "undersized", "shifted")
MULTICLASS_CLASSES = {"other": 0, "lake": 1, "snow_ice": 2}
BINARY_CLASSES = {"background": 0, "water": 1}

# Chip centres of the default regions (the glacial-lake belts of the CryoSentinel use case).
REGION_CENTRES: dict[str, tuple[float, float]] = {
    "tien_shan": (42.0, 78.5),
    "ile_alatau": (43.05, 77.0),
    "zhetysu_alatau": (45.0, 80.0),
}

# Mean reflectance x 10000 per class over S2_BANDS (443 ... 2190 nm).
SPECTRA = {
    "water_clear": np.array([900, 750, 800, 450, 330, 240, 200, 170, 160, 110, 90, 70], dtype=float),
    "water_turquoise": np.array([1100, 1100, 1250, 750, 560, 360, 300, 260, 240, 160, 130, 100], dtype=float),
    "snow": np.array([8800, 9000, 8900, 8600, 8400, 8000, 7700, 7400, 7200, 6000, 900, 700], dtype=float),
    "ice": np.array([5500, 5600, 5300, 4800, 4600, 4200, 3900, 3600, 3400, 2700, 500, 380], dtype=float),
    "rock": np.array([1300, 1400, 1700, 2000, 2200, 2350, 2450, 2500, 2550, 2500, 2900, 2500], dtype=float),
    "vegetation": np.array([400, 450, 800, 500, 1300, 2800, 3400, 3600, 3700, 3000, 2200, 1200], dtype=float),
    "cloud": np.array([7500, 7600, 7700, 7800, 7800, 7900, 7900, 8000, 8000, 6500, 7900, 6500], dtype=float),
}
# Share of skylight (diffuse, blue-rich) in the illumination of a flat sunlit surface per band.
DIFFUSE_FRACTION = np.array([0.45, 0.38, 0.28, 0.20, 0.17, 0.15, 0.13, 0.12, 0.11, 0.10, 0.06, 0.05])
VISIBLE = 4  # B01..B04: bands in which a shallow lake bottom shows through

# Mean backscatter (VV, VH) in dB per class.
SAR_DB = {
    "water": (-22.0, -28.0),
    "rock": (-8.0, -15.0),
    "vegetation": (-11.0, -17.0),
    "dry_snow": (-11.0, -19.0),
    "wet_snow": (-19.0, -25.0),
}
SAR_LOOKS = 4.4  # equivalent number of looks of Sentinel-1 IW GRD
NODATA_CHIP_FRACTION = 0.05
MAX_YEARS_PER_SITE = 3
SITE_JITTER_DEG = 0.035  # chip centres stay this close to their block centre (< half a block minus the buffer)


class SyntheticConfigError(ValueError):
    """The synthetic-data configuration cannot produce the requested chips."""


# --------------------------------------------------------------------------- bands


def synthetic_bands() -> list[BandSpec]:
    """The 15 bands of a synthetic chip: S2 L2A (12, reflectance x 10000), S1 GRD VV/VH (dB), DEM (m)."""
    s2 = [BandSpec(name, "S2L2A", optical=True) for name in S2_BANDS]
    s1 = [BandSpec(name, "S1GRD") for name in S1_BANDS]
    return [*s2, *s1, BandSpec("DEM", "DEM")]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SitePlan:
    """Where a site lies and what it holds, decided before any pixel is drawn."""

    index: int
    region: str
    lat: float
    lon: float
    lake_areas: tuple[float, ...]  # target areas in pixels, largest first; empty = no lake


@dataclass(frozen=True)
class ChipPlan:
    """One chip: a site observed in one year, with its scene conditions and label corruption."""

    index: int
    site: int
    year: int
    cloudy: bool
    nodata_stripe: bool
    noise: str  # "" or one of NOISE_KINDS


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for (seed, key...), e.g. key (1, site) or (2, chip)."""
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


STREAM_PLAN, STREAM_SITE, STREAM_CHIP = 0, 1, 2


def block_bucket(lat: float, lon: float, block_deg: float, salt: str) -> int:
    """Hash bucket 0..99 of the lat/lon block holding a point (the CryoSentinel block split)."""
    key = f"{salt}|{math.floor(lat / block_deg)}|{math.floor(lon / block_deg)}".encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16) % 100


def region_centre(region: str) -> tuple[float, float]:
    """Centre of a named region; unknown names get a stable place in High Mountain Asia."""
    if region in REGION_CENTRES:
        return REGION_CENTRES[region]
    digest = int(hashlib.sha1(region.encode()).hexdigest()[:8], 16)
    return 38.0 + (digest % 800) / 100.0, 68.0 + (digest // 800 % 1800) / 100.0


def _choose_blocks(region: str, position: int, n_blocks: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Block centres for a region, in the order sites fill them.

    Blocks are picked so that the default block split (`SplitConfig` defaults) has train, val and test
    blocks in every region (about 15 % each for val and test), and the first three blocks are one of each,
    rotated by the region's position, so that even a handful of sites spreads over all three splits.
    """
    split = SplitConfig()
    size = split.block_deg
    lat0, lon0 = region_centre(region)
    i0, j0 = math.floor(lat0 / size), math.floor(lon0 / size)
    by_split: dict[str, list[tuple[float, float]]] = {"train": [], "val": [], "test": []}
    for i in range(i0 - 4, i0 + 5):
        for j in range(j0 - 4, j0 + 5):
            centre = ((i + 0.5) * size, (j + 0.5) * size)
            bucket = block_bucket(*centre, size, split.salt)
            held = bucket - split.train_percent
            name = "train" if held < 0 else "val" if held < split.val_percent else "test"
            by_split[name].append(centre)
    for pool in by_split.values():
        pool[:] = [pool[k] for k in rng.permutation(len(pool))]
    n_held = max(1, round(0.15 * n_blocks))
    counts = {"train": max(n_blocks - 2 * n_held, 1), "val": n_held, "test": n_held}
    names = ["train", "val", "test"]
    names = names[position % 3 :] + names[: position % 3]
    first = [by_split[name].pop() for name in names if by_split[name]]
    rest = [c for name in names for c in by_split[name][: counts[name] - 1]]
    return first + [rest[k] for k in rng.permutation(len(rest))]


def _validated_lists(cfg: SyntheticConfig) -> tuple[list[str], list[int]]:
    regions = list(cfg.regions)
    if not regions or any(not name for name in regions) or len(set(regions)) != len(regions):
        raise SyntheticConfigError(f"data.synthetic.regions must be unique non-empty names, got {regions}")
    years = sorted(set(cfg.years))
    if not years:
        raise SyntheticConfigError("data.synthetic.years must list at least one year")
    return regions, years


def plan_chips(cfg: SyntheticConfig) -> tuple[list[SitePlan], list[ChipPlan]]:
    """Decide sites (region, place, lakes) and chips (site x year, clouds, nodata, label noise)."""
    regions, years = _validated_lists(cfg)
    rng = _rng(cfg.seed, STREAM_PLAN)
    scale = (cfg.chip_size / 64) ** 2

    site_years: list[list[int]] = []
    n_planned = 0
    while n_planned < cfg.n_chips:
        count = int(rng.integers(1, min(MAX_YEARS_PER_SITE, len(years)) + 1))
        chosen = sorted(int(y) for y in rng.choice(years, size=count, replace=False))[: cfg.n_chips - n_planned]
        site_years.append(chosen)
        n_planned += len(chosen)
    n_sites = len(site_years)

    # lakes: whole sites hold lakes (a lake persists over the years) until the chip quota is reached
    target_lake_chips = round(cfg.lake_fraction * cfg.n_chips)
    has_lake = np.zeros(n_sites, dtype=bool)
    covered = 0
    for site in rng.permutation(n_sites):
        if covered >= target_lake_chips:
            break
        has_lake[site] = True
        covered += len(site_years[site])

    blocks_per_region = max(3, min(16, math.ceil(n_sites / (2 * len(regions)))))
    region_blocks = {name: _choose_blocks(name, k, blocks_per_region, rng) for k, name in enumerate(regions)}
    sites: list[SitePlan] = []
    for index in range(n_sites):
        region = regions[index % len(regions)]
        blocks = region_blocks[region]
        lat_c, lon_c = blocks[(index // len(regions)) % len(blocks)]
        lat = lat_c + rng.uniform(-SITE_JITTER_DEG, SITE_JITTER_DEG)
        lon = lon_c + rng.uniform(-SITE_JITTER_DEG, SITE_JITTER_DEG)
        areas: tuple[float, ...] = ()
        if has_lake[index]:
            n_lakes = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            drawn = np.exp(rng.uniform(np.log(40 * scale), np.log(600 * scale), size=n_lakes))
            areas = tuple(float(a) for a in sorted(drawn, reverse=True))
        sites.append(SitePlan(index, region, round(float(lat), 6), round(float(lon), 6), areas))

    chip_sites = [site for site, ys in enumerate(site_years) for _ in ys]
    chip_years = [year for ys in site_years for year in ys]
    n = len(chip_sites)
    cloudy = _pick(rng, n, round(cfg.cloud_fraction * n))
    stripes = _pick(rng, n, round(NODATA_CHIP_FRACTION * n))
    noise = _plan_noise(cfg, rng, sites, chip_sites)
    chips = [
        ChipPlan(i, chip_sites[i], chip_years[i], bool(cloudy[i]), bool(stripes[i]), noise.get(i, "")) for i in range(n)
    ]
    return sites, chips


def _pick(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[: min(count, n)]] = True
    return flags


def _plan_noise(
    cfg: SyntheticConfig, rng: np.random.Generator, sites: list[SitePlan], chip_sites: list[int]
) -> dict[int, str]:
    """Exactly round(noise_fraction * n_chips) lake chips (capped at the lake chips), kinds in turn.

    Chips whose largest lake is not tiny come first, so every corruption changes the label visibly.
    """
    count = round(cfg.noise_fraction * len(chip_sites))
    large = 100 * (cfg.chip_size / 64) ** 2
    lake_chips = [i for i, s in enumerate(chip_sites) if sites[s].lake_areas]
    order = rng.permutation(len(lake_chips))
    ranked = sorted(order, key=lambda k: sites[chip_sites[lake_chips[k]]].lake_areas[0] < large)
    chosen = sorted(lake_chips[k] for k in ranked[:count])
    kinds = [NOISE_KINDS[k % len(NOISE_KINDS)] for k in range(len(chosen))]
    rng.shuffle(kinds)
    return dict(zip(chosen, kinds))


# --------------------------------------------------------------------------- sites


@dataclass
class Lake:
    """A lake basin at its largest extent; `depth` grows from 0 at the shore to 1 at the deepest pixel."""

    basin: np.ndarray  # bool (y, x)
    depth: np.ndarray  # float (y, x), 0 outside the basin
    turbidity: float  # 0 clear ... 1 turquoise glacial flour
    roughness_db: float  # wind roughening of the SAR backscatter


@dataclass
class Site:
    """Everything about a place that does not change between years."""

    plan: SitePlan
    terrain: np.ndarray  # DEM with lake beds carved, before the lake surface is filled in (m)
    lakes: list[Lake]
    rock_spectrum: np.ndarray
    rock_texture: np.ndarray
    cover_noise: np.ndarray  # smooth field that roughens the snow line and the meadow edge
    ice_field: np.ndarray  # where snow gives way to bare glacier ice
    shadow_field: np.ndarray  # where shadowed slopes appear when the sun is low
    snow_fraction: float
    vegetation_fraction: float
    look_sign: float  # +1: the radar looks east (ascending), -1: west
    sun_azimuth: float  # radians clockwise from north
    sun_zenith: float


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(float), xx.astype(float)


def _terrain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth mountain terrain in metres: base level, a regional slope, a few bumps and low-frequency noise."""
    yy, xx = _grid(size)
    base = rng.uniform(3350, 4150)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.05, 0.3) * 10.0  # m per 10 m pixel
    dem = base + gradient * ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle))
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(-0.2 * size, 1.2 * size, size=2)
        sigma = rng.uniform(0.15, 0.45) * size
        amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(30, 140)
        dem += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    dem += rng.uniform(6, 20) * _smooth_noise(rng, (size, size), size / 10)
    return np.clip(dem, 3000.0, 4500.0)


def _blob(rng: np.random.Generator, size: int, centre: tuple[float, float], area: float) -> np.ndarray:
    """An irregular ellipse of about `area` pixels: a radius modulated by a few angular harmonics."""
    yy, xx = _grid(size)
    ratio = rng.uniform(0.45, 1.0)
    theta = rng.uniform(0, np.pi)
    a = np.sqrt(area / (np.pi * ratio))
    b = a * ratio
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    radius = np.ones_like(rho)
    for k in range(2, 6):
        radius += rng.uniform(0, 0.16) / (k - 1) ** 0.7 * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.asarray(rho <= radius)


def _place_lakes(rng: np.random.Generator, terrain: np.ndarray, areas: tuple[float, ...]) -> list[np.ndarray]:
    """Lake basins on low ground, largest first, apart from each other by a few pixels."""
    size = terrain.shape[0]
    basins: list[np.ndarray] = []
    taken = np.zeros_like(terrain, dtype=bool)
    for area in areas:
        best: np.ndarray | None = None
        for _ in range(30):
            candidates = rng.uniform(0.12 * size, 0.88 * size, size=(8, 2))
            heights = terrain[candidates[:, 0].astype(int), candidates[:, 1].astype(int)]
            centre = candidates[int(np.argmin(heights))]
            basin = _blob(rng, size, (float(centre[0]), float(centre[1])), area)
            if basin.sum() < max(0.6 * area, 20) or (basin & taken).any():
                continue
            best = basin
            break
        if best is None:
            if basins:
                continue
            best = _blob(rng, size, (size / 2, size / 2), area)  # the first lake always fits
        basins.append(best)
        taken |= ndimage.binary_dilation(best, iterations=4)
    return basins


def _carve(
    rng: np.random.Generator, terrain: np.ndarray, basins: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sink each basin into a bowl and give it a bed below its lowest shore pixel; returns DEM and depths."""
    yy, xx = _grid(terrain.shape[0])
    dem = terrain.copy()
    for basin in basins:
        cy, cx = (float(c) for c in np.argwhere(basin).mean(axis=0))
        sigma = 1.8 * np.sqrt(basin.sum() / np.pi) + 2.0
        dem -= rng.uniform(20, 60) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    depths = []
    for basin in basins:
        inside = ndimage.distance_transform_edt(basin)
        depth = inside / inside.max()
        shore = ndimage.binary_dilation(basin, iterations=2) & ~basin
        spill = dem[shore].min() if shore.any() else dem[basin].max()
        dem[basin] = spill - 1.0 - rng.uniform(8, 30) * depth[basin]
        depths.append(depth)
    return ndimage.gaussian_filter(dem, sigma=0.7, mode="nearest"), depths


def build_site(cfg: SyntheticConfig, plan: SitePlan) -> Site:
    """Terrain, lakes and the stable surface properties of one site."""
    rng = _rng(cfg.seed, STREAM_SITE, plan.index)
    size = cfg.chip_size
    terrain = _terrain(rng, size)
    basins = _place_lakes(rng, terrain, plan.lake_areas)
    dem, depths = _carve(rng, terrain, basins)
    lakes = [
        Lake(basin, depth, float(rng.uniform(0, 1)), float(rng.normal(0, 1.5))) for basin, depth in zip(basins, depths)
    ]
    base = float(np.median(dem))
    snow = 0.0 if rng.uniform() < 0.25 else float(np.clip(rng.uniform(0.03, 0.4) + (base - 3750) / 2000, 0, 0.55))
    vegetation = float(rng.uniform(0, 0.45) * np.clip((4150 - base) / 700, 0, 1))
    rock = SPECTRA["rock"] * rng.uniform(0.75, 1.25)
    rock = rock * (1 + rng.uniform(-0.08, 0.15) * np.linspace(0, 1, len(S2_BANDS)))
    texture = 1 + 0.08 * _smooth_noise(rng, (size, size), 1.2) + 0.1 * _smooth_noise(rng, (size, size), size / 8)
    return Site(
        plan=plan,
        terrain=dem,
        lakes=lakes,
        rock_spectrum=rock,
        rock_texture=np.clip(texture, 0.5, 1.6),
        cover_noise=_smooth_noise(rng, (size, size), size / 12),
        ice_field=_smooth_noise(rng, (size, size), size / 10),
        shadow_field=_smooth_noise(rng, (size, size), size / 8),
        snow_fraction=snow,
        vegetation_fraction=vegetation,
        look_sign=float(rng.choice([-1.0, 1.0])),
        sun_azimuth=float(np.deg2rad(rng.uniform(140, 165))),
        sun_zenith=float(np.deg2rad(rng.uniform(28, 42))),
    )


# --------------------------------------------------------------------------- chips


@dataclass
class SyntheticScene:
    """One rendered chip with the simulated ground truth behind it."""

    image: np.ndarray  # (15, y, x) float32
    label: np.ndarray  # (y, x) uint8, possibly corrupted
    clean_label: np.ndarray  # (y, x) uint8
    valid: np.ndarray  # (y, x) bool
    surface: np.ndarray  # (y, x) uint8, SURFACE_CLASSES
    illumination: np.ndarray  # (y, x) uint8, ILLUMINATION_CLASSES
    n_lakes: int


def _lake_masks(rng: np.random.Generator, site: Site) -> list[tuple[np.ndarray, np.ndarray]]:
    """This year's water extent of each lake (the shallowest rim dries out in low-water years)."""
    masks = []
    for lake in site.lakes:
        water = lake.basin & (lake.depth > rng.uniform(0, 0.12))
        masks.append((water, lake.depth))
    return masks


def _fill_lakes(terrain: np.ndarray, waters: list[np.ndarray]) -> np.ndarray:
    """DEM with each lake flat at the level of its lowest shore pixel, rounded to whole metres."""
    dem = terrain.copy()
    for water in waters:
        if not water.any():
            continue
        shore = ndimage.binary_dilation(water) & ~water
        dem[water] = dem[shore].min() if shore.any() else dem[water].max()
    return np.round(dem)


def _land_cover(rng: np.random.Generator, site: Site, dem: np.ndarray, water: np.ndarray) -> tuple[np.ndarray, bool]:
    """Surface classes: snow on high and north-facing ground, meadow low down, rock elsewhere, lakes."""
    relief = dem - dem.min()
    relative = relief / max(float(relief.max()), 1.0)
    gy, _ = np.gradient(dem, 10.0)
    northness = np.tanh(3 * gy)  # y grows southwards: terrain rising to the south faces north
    surface = np.full(dem.shape, SURFACE_CLASSES["rock"], dtype=np.uint8)
    land = ~water
    snow_fraction = float(np.clip(site.snow_fraction + rng.normal(0, 0.05), 0, 0.7)) if site.snow_fraction else 0.0
    if snow_fraction > 0:
        score = relative + 0.3 * site.cover_noise + 0.15 * northness
        snow = land & (score > np.quantile(score[land], 1 - snow_fraction))
        surface[snow] = SURFACE_CLASSES["snow"]
    vegetation_fraction = float(np.clip(site.vegetation_fraction + rng.normal(0, 0.03), 0, 0.6))
    free = land & (surface == SURFACE_CLASSES["rock"])
    if vegetation_fraction > 0 and free.any():
        score = -relative + 0.3 * site.cover_noise
        meadow = free & (score > np.quantile(score[land], 1 - vegetation_fraction))
        surface[meadow] = SURFACE_CLASSES["vegetation"]
    surface[water] = SURFACE_CLASSES["water"]
    wet_snow = bool(rng.uniform() < 0.3)
    return surface, wet_snow


def _reflectance(
    rng: np.random.Generator, site: Site, surface: np.ndarray, lake_masks: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Surface reflectance x 10000 (12, y, x) under flat, fully sunlit conditions."""
    size = surface.shape[0]
    bands = len(S2_BANDS)
    out = np.zeros((bands, size, size))

    def chip_gain() -> np.ndarray:
        """Per-chip brightness and a little per-band calibration spread."""
        return rng.uniform(0.9, 1.1) * (1 + rng.normal(0, 0.025, size=bands))

    rock = surface == SURFACE_CLASSES["rock"]
    out[:, rock] = (site.rock_spectrum * chip_gain())[:, None] * site.rock_texture[rock][None]

    meadow = surface == SURFACE_CLASSES["vegetation"]
    if meadow.any():
        vigour = 1 + 0.1 * _smooth_noise(rng, (size, size), 1.5)
        spectrum = SPECTRA["vegetation"] * chip_gain()
        out[:, meadow] = spectrum[:, None] * vigour[meadow][None]

    snow = surface == SURFACE_CLASSES["snow"]
    if snow.any():
        ice = np.clip(0.5 + 0.6 * site.ice_field, 0, 1) * rng.uniform(0.2, 0.9)
        mix = (1 - ice)[None] * SPECTRA["snow"][:, None, None] + ice[None] * SPECTRA["ice"][:, None, None]
        out[:, snow] = (mix * chip_gain()[:, None, None])[:, snow]

    for (water, depth), lake in zip(lake_masks, site.lakes):
        if not water.any():
            continue
        t = float(np.clip(lake.turbidity + rng.normal(0, 0.1), 0, 1))
        spectrum = ((1 - t) * SPECTRA["water_clear"] + t * SPECTRA["water_turquoise"]) * chip_gain()
        shallow = np.clip(1 - depth / 0.35, 0, 1)  # the bottom shows through near the shore
        pixel = spectrum[:, None] * (1 + 0.04 * rng.standard_normal(int(water.sum())))[None]
        pixel[:VISIBLE] *= 1 + 0.25 * shallow[water][None]
        out[:, water] = pixel
    return out


def _illumination_factor(site: Site, dem: np.ndarray) -> np.ndarray:
    """Direct-sunlight factor cos(incidence) / cos(zenith) of each pixel's slope."""
    gy, gx = np.gradient(dem, 10.0)
    sun = np.array(
        [
            np.sin(site.sun_zenith) * np.sin(site.sun_azimuth),  # east
            -np.sin(site.sun_zenith) * np.cos(site.sun_azimuth),  # south (row direction)
            np.cos(site.sun_zenith),
        ]
    )
    cos_incidence = (-gx * sun[0] - gy * sun[1] + sun[2]) / np.sqrt(gx**2 + gy**2 + 1)
    return np.clip(cos_incidence / np.cos(site.sun_zenith), 0.05, 1.6)


def _cloud_and_shadow(rng: np.random.Generator, site: Site, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cloud opacity and the opacity of its shadow, displaced away from the sun."""
    margin = math.ceil(size / 3)
    canvas = size + 2 * margin
    field = _smooth_noise(rng, (canvas, canvas), size / 7)
    threshold = np.quantile(field, 1 - rng.uniform(0.2, 0.55))
    alpha = np.clip((field - threshold) / 0.6, 0, 1) ** 0.7
    length = rng.uniform(size / 6, size / 3)
    dx = -length * np.sin(site.sun_azimuth)
    dy = length * np.cos(site.sun_azimuth)  # shadow falls away from the sun (towards north-west)
    oy, ox = round(margin - dy), round(margin - dx)
    cloud = alpha[margin : margin + size, margin : margin + size]
    shadow = alpha[oy : oy + size, ox : ox + size]
    return cloud, shadow


def _terrain_shadow(rng: np.random.Generator, site: Site, direct: np.ndarray) -> np.ndarray:
    """Soft shadow over some slopes facing away from the sun (cast by ridges outside the chip)."""
    if rng.uniform() >= 0.3:
        return np.zeros_like(direct)
    score = site.shadow_field - 1.5 * direct
    threshold = np.quantile(score, 1 - rng.uniform(0.03, 0.12))
    return np.clip((score - threshold) / 0.25 + 0.5, 0, 1)


def _optical(
    rng: np.random.Generator,
    site: Site,
    reflectance: np.ndarray,
    dem: np.ndarray,
    cloudy: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Observed S2 values and the illumination class of each pixel."""
    size = dem.shape[0]
    direct = _illumination_factor(site, dem)
    terrain_shadow = _terrain_shadow(rng, site, direct)
    if cloudy:
        cloud, cloud_shadow = _cloud_and_shadow(rng, site, size)
    else:
        cloud = cloud_shadow = np.zeros_like(dem)
    blocked = 1 - (1 - 0.96 * cloud_shadow) * (1 - 0.9 * terrain_shadow)
    sky = 1 - 0.4 * cloud_shadow
    light = (1 - DIFFUSE_FRACTION)[:, None, None] * (direct * (1 - blocked))[None]
    light = light + DIFFUSE_FRACTION[:, None, None] * sky[None]
    observed = reflectance * light
    if cloudy:
        tops = 0.85 + 0.12 * _smooth_noise(rng, (size, size), 2.0)
        observed = (1 - cloud)[None] * observed + cloud[None] * SPECTRA["cloud"][:, None, None] * tops[None]
    observed = observed + rng.normal(0, 1, size=observed.shape) * (12 + 0.01 * observed)
    observed = np.clip(np.round(observed), 0, S2_MAX)

    illumination = np.full((size, size), ILLUMINATION_CLASSES["sunlit"], dtype=np.uint8)
    illumination[terrain_shadow >= 0.5] = ILLUMINATION_CLASSES["terrain_shadow"]
    illumination[cloud_shadow >= 0.5] = ILLUMINATION_CLASSES["cloud_shadow"]
    illumination[cloud >= 0.5] = ILLUMINATION_CLASSES["cloud"]
    return observed, illumination


def _sar(
    rng: np.random.Generator,
    site: Site,
    surface: np.ndarray,
    dem: np.ndarray,
    lake_masks: list[tuple[np.ndarray, np.ndarray]],
    wet_snow: bool,
) -> np.ndarray:
    """VV and VH backscatter in dB with slope effects and gamma speckle applied in linear power."""
    size = dem.shape[0]
    _, gx = np.gradient(dem, 10.0)
    facing = np.tanh(1.5 * site.look_sign * gx)  # slopes facing the radar are brighter (local incidence)
    texture = _smooth_noise(rng, (size, size), 2.0)
    calibration = rng.normal(0, 0.5)
    out = np.zeros((2, size, size))
    snow_key = "wet_snow" if wet_snow else "dry_snow"
    for name, key in (("rock", "rock"), ("vegetation", "vegetation"), ("snow", snow_key)):
        mask = surface == SURFACE_CLASSES[name]
        vv, vh = SAR_DB[key]
        out[0, mask] = vv
        out[1, mask] = vh
    land = surface != SURFACE_CLASSES["water"]
    out[:, land] += (10.0 * facing + 1.2 * texture)[land][None]
    for (water, _), lake in zip(lake_masks, site.lakes):
        out[0, water] = SAR_DB["water"][0] + lake.roughness_db
        out[1, water] = SAR_DB["water"][1] + lake.roughness_db
    power = 10 ** ((out + calibration) / 10) * rng.gamma(SAR_LOOKS, 1 / SAR_LOOKS, size=out.shape)
    return 10 * np.log10(np.maximum(power, 1e-6))


def _nodata_stripe(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin stripe (1-3 px) across the chip where Sentinel-2 has no data."""
    yy, xx = _grid(size)
    width = rng.uniform(1.0, 3.0)
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(0.2 * size, 0.8 * size)
    distance = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle) + size / 2 - offset
    return np.asarray(np.abs(distance) < width / 2)


def s2_valid(s2: np.ndarray) -> np.ndarray:
    """CryoSentinel nodata rule: S2 is invalid where all 12 bands are 0 or all are at the 16000 clip."""
    return ~((s2 == 0).all(axis=0) | (s2 >= S2_MAX).all(axis=0))


def _corrupt(rng: np.random.Generator, kind: str, lake_masks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A label with one lake omitted, undersized (<= 40 % of its area) or the whole label shifted."""
    waters = [water for water, _ in lake_masks]
    clean = np.any(waters, axis=0)
    largest = int(np.argmax([water.sum() for water in waters]))
    water, depth = lake_masks[largest]
    if kind == "omitted":
        return clean & ~water
    if kind == "undersized":
        keep = max(1, int(0.35 * water.sum()))
        order = np.argsort(-depth[water], kind="stable")[:keep]
        kept = np.zeros(int(water.sum()), dtype=bool)
        kept[order] = True
        shrunk = np.zeros_like(water)
        shrunk[water] = kept
        return (clean & ~water) | shrunk
    if kind == "shifted":
        return _shift_label(rng, clean, water)
    raise ValueError(f"unknown label-noise kind {kind!r}; expected one of {NOISE_KINDS}")


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a mask by (dy, dx) pixels, filling with background."""
    out = np.zeros_like(mask)
    size_y, size_x = mask.shape
    src = mask[max(0, -dy) : size_y - max(0, dy), max(0, -dx) : size_x - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    counts = confusion_counts(a, b, per_image=False)
    return float(iou_score(*counts, zero_division=1.0)[0])


def _shift_label(rng: np.random.Generator, clean: np.ndarray, lake: np.ndarray) -> np.ndarray:
    """Shift the label by at least a third of the largest lake's width, keeping that lake mostly in the chip."""
    rows, cols = np.nonzero(lake)
    height, width = int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1
    directions = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    best: np.ndarray | None = None
    best_kept = -1.0
    for k in rng.permutation(len(directions)):
        dy, dx = directions[k]
        step_y = max(3, math.ceil(0.45 * height)) * dy
        step_x = max(3, math.ceil(0.45 * width)) * dx
        shifted = _shift(clean, step_y, step_x)
        while _iou(shifted, clean) >= 0.6 and shifted.any():
            step_y, step_x = step_y + dy, step_x + dx
            shifted = _shift(clean, step_y, step_x)
        kept = _shift(lake, step_y, step_x).sum() / lake.sum()
        if kept > best_kept:
            best, best_kept = shifted, kept
        if kept >= 0.8:
            break
    assert best is not None
    return best


def render_chip(cfg: SyntheticConfig, site: Site, plan: ChipPlan) -> SyntheticScene:
    """Draw one chip of `site` in the year and conditions of `plan`."""
    rng = _rng(cfg.seed, STREAM_CHIP, plan.index)
    lake_masks = _lake_masks(rng, site)
    waters = [water for water, _ in lake_masks]
    water = np.any(waters, axis=0) if waters else np.zeros(site.terrain.shape, dtype=bool)
    dem = _fill_lakes(site.terrain, waters)
    surface, wet_snow = _land_cover(rng, site, dem, water)
    reflectance = _reflectance(rng, site, surface, lake_masks)
    s2, illumination = _optical(rng, site, reflectance, dem, plan.cloudy)
    if plan.nodata_stripe:
        s2[:, _nodata_stripe(rng, cfg.chip_size)] = 0
    sar = _sar(rng, site, surface, dem, lake_masks, wet_snow)
    image = np.concatenate([s2, sar, dem[None]]).astype(np.float32)
    clean = water.astype(np.uint8)
    label = _corrupt(rng, plan.noise, lake_masks).astype(np.uint8) if plan.noise else clean.copy()
    if cfg.multiclass:
        clean = multiclass_label(clean.astype(bool), surface, illumination)
        label = multiclass_label(label.astype(bool), surface, illumination)
    return SyntheticScene(
        image=image,
        label=label,
        clean_label=clean,
        valid=s2_valid(s2),
        surface=surface,
        illumination=illumination,
        n_lakes=int(sum(bool(w.any()) for w in waters)),
    )


def multiclass_label(lake: np.ndarray, surface: np.ndarray, illumination: np.ndarray) -> np.ndarray:
    """The three-class label (`MULTICLASS_CLASSES`) from a lake mask and the simulated surface and illumination.

    Lake pixels (as labelled, so a corrupted lake outline stays corrupted) are `lake`, snow and ice surface
    outside them `snow_ice`, the rest `other`; pixels under a cloud are `IGNORE_INDEX`.
    """
    label = np.full(lake.shape, MULTICLASS_CLASSES["other"], dtype=np.uint8)
    label[surface == SURFACE_CLASSES["snow"]] = MULTICLASS_CLASSES["snow_ice"]
    label[np.asarray(lake, dtype=bool)] = MULTICLASS_CLASSES["lake"]
    label[illumination == ILLUMINATION_CLASSES["cloud"]] = IGNORE_INDEX
    return label


def _chip_id(site: SitePlan, year: int) -> str:
    return f"{site.region}-s{site.index:04d}-{year}"


@functools.lru_cache(maxsize=8)
def _to_crs(crs: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)


def utm_georeference(lat: float, lon: float, size: int, pixel_size_m: float = PIXEL_SIZE_M) -> dict[str, Any]:
    """The chip's CRS (the WGS84 UTM zone of its centre) and bounds: a size x size grid of pixel_size_m pixels
    centred on (lat, lon), as a GeoTIFF-based store records them (`workbench.data.sources.chip_georeference`)."""
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    crs = f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"
    x, y = _to_crs(crs).transform(lon, lat)
    half = size * pixel_size_m / 2.0
    return {"crs": crs, "x_min": x - half, "y_min": y - half, "x_max": x + half, "y_max": y + half}


def _to_chip(site: SitePlan, plan: ChipPlan, scene: SyntheticScene) -> Chip:
    extra: dict[str, Any] = {
        "site_id": f"{site.region}-s{site.index:04d}",
        "noise": plan.noise,
        "noisy": bool(plan.noise),
        "clean_positive_fraction": positive_fraction(scene.clean_label, scene.valid),
        "cloud_fraction": float((scene.illumination == ILLUMINATION_CLASSES["cloud"]).mean()),
        "shadow_fraction": float(
            np.isin(
                scene.illumination, [ILLUMINATION_CLASSES["cloud_shadow"], ILLUMINATION_CLASSES["terrain_shadow"]]
            ).mean()
        ),
        "snow_fraction": float((scene.surface == SURFACE_CLASSES["snow"]).mean()),
        "n_lakes": scene.n_lakes,
        **utm_georeference(site.lat, site.lon, int(scene.label.shape[-1])),
    }
    return Chip(
        chip_id=_chip_id(site, plan.year),
        image=scene.image,
        label=scene.label,
        valid=scene.valid,
        lat=site.lat,
        lon=site.lon,
        region=site.region,
        year=plan.year,
        split="",
        source=SOURCE,
        extra=extra,
        planes={"clean_label": scene.clean_label, "surface": scene.surface, "illumination": scene.illumination},
    )


def iter_synthetic_chips(cfg: SyntheticConfig, progress: bool = False) -> Iterator[Chip]:
    """All chips of `cfg` in store order, built one site at a time (memory stays bounded)."""
    sites, chips = plan_chips(cfg)
    current: Site | None = None
    for plan in tqdm(chips, desc="synthetic chips", unit="chip", disable=not progress):
        if current is None or current.plan.index != plan.site:
            current = build_site(cfg, sites[plan.site])
        yield _to_chip(current.plan, plan, render_chip(cfg, current, plan))


def store_attrs(cfg: SyntheticConfig) -> dict[str, Any]:
    """The attributes recorded in a synthetic store's store.json (used to decide whether to regenerate)."""
    # the binary store records the configuration without the multiclass switch, so stores written before the
    # switch existed are recognised as the same store (and not regenerated)
    synthetic = cfg.model_dump(mode="json", exclude=None if cfg.multiclass else {"multiclass"})
    return {
        "synthetic": synthetic,
        "generator": "workbench.data.synthetic.generate_glacial_lakes",
        "generator_version": GENERATOR_VERSION,
        "surface_classes": dict(SURFACE_CLASSES),
        "illumination_classes": dict(ILLUMINATION_CLASSES),
        "label_classes": dict(MULTICLASS_CLASSES if cfg.multiclass else BINARY_CLASSES),
        "pixel_size_m": PIXEL_SIZE_M,
    }


def generate_glacial_lakes(dest: Path, cfg: SyntheticConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the synthetic glacial-lake chips of `cfg` as a chip store at `dest` (atomically) and return it."""
    dest = Path(dest)
    with StoreWriter(dest, synthetic_bands(), source=SOURCE, attrs=store_attrs(cfg), overwrite=overwrite) as writer:
        for chip in iter_synthetic_chips(cfg, progress=progress):
            writer.append(chip)
    return dest


def ensure_synthetic_store(dest: Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Reuse the store at `dest` when it was generated from the same `cfg`, otherwise (re)generate it."""
    dest = Path(dest)
    try:
        attrs = read_store_meta(dest).get("attrs", {})
    except (FileNotFoundError, ValueError):
        attrs = None
    if attrs is not None and {key: attrs.get(key) for key in store_attrs(cfg)} == store_attrs(cfg):
        return dest
    return generate_glacial_lakes(dest, cfg, overwrite=True, progress=progress)
