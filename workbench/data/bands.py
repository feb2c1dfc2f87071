"""Matching a model's bands to another store's bands by name, with aliases for common sensors.

A model trained on Landsat (Blue, Green, Red, NIR, SWIR1, SWIR2; ukis-csmask names SWIR16, SWIR22) can be
scored on Sentinel-2 (B02, B03, B04, B08, B11, B12) and back: each group below names one spectral band
under the names sensors and data sets use. An explicit map (model band -> store band) wins over aliases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BAND_ALIASES: tuple[tuple[str, ...], ...] = (
    ("blue", "B02", "B2", "Blue"),
    ("green", "B03", "B3", "Green"),
    ("red", "B04", "B4", "Red"),
    ("nir", "B08", "B8", "NIR", "B8A"),
    ("swir1", "B11", "SWIR1", "SWIR16"),
    ("swir2", "B12", "SWIR2", "SWIR22"),
)


class BandMatchError(ValueError):
    """A model band has no counterpart in the store; the message names it and the fix."""


def aliases(name: str) -> list[str]:
    """Every name of the spectral band `name` (itself first), compared case-insensitively."""
    for group in BAND_ALIASES:
        if name.lower() in {alias.lower() for alias in group}:
            return [name, *[alias for alias in group if alias.lower() != name.lower()]]
    return [name]


def parse_band_map(text: str | None) -> dict[str, str]:
    """`MODEL=STORE,MODEL=STORE` from the command line as a dict."""
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        model, sep, store = item.partition("=")
        if not sep or not model.strip() or not store.strip():
            raise BandMatchError(f"--bands expects MODEL=STORE pairs separated by commas, got {item!r}")
        pairs[model.strip()] = store.strip()
    return pairs


def match_bands(
    model_bands: Sequence[str], store_bands: Sequence[str], explicit: Mapping[str, str] | None = None
) -> list[str]:
    """The store band feeding each model band, in the model's order: explicit map, same name, then alias."""
    explicit = dict(explicit or {})
    by_lower = {name.lower(): name for name in store_bands}
    unknown = sorted(set(explicit) - set(model_bands))
    if unknown:
        raise BandMatchError(
            f"--bands names {unknown}, which are not model bands; the model's bands are {list(model_bands)}"
        )
    chosen: list[str] = []
    missing: list[str] = []
    for band in model_bands:
        if band in explicit:
            if explicit[band] not in store_bands:
                raise BandMatchError(
                    f"--bands maps {band} to {explicit[band]!r}, which the store lacks: {list(store_bands)}"
                )
            chosen.append(explicit[band])
            continue
        found = next((by_lower[a.lower()] for a in aliases(band) if a.lower() in by_lower), None)
        if found is None:
            missing.append(band)
        else:
            chosen.append(found)
    if missing:
        raise BandMatchError(
            f"the store has no band for model band(s) {missing} (store bands: {list(store_bands)}); map them with "
            "--bands MODEL=STORE, or score a store that holds them"
        )
    if len(set(chosen)) != len(chosen):
        raise BandMatchError(f"two model bands map to the same store band: {dict(zip(model_bands, chosen))}")
    return chosen
