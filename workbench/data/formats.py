"""Names of the input formats `workbench ingest` reads (kept import-light for the command line's help)."""

from __future__ import annotations

FORMAT_NAMES = (
    "landslide4sense",
    "cloud38",
    "sen1floods11",
    "terramesh",
    "cryosentinel",
    "npz",
    "ukis-csmask",
    "geotiff",
    "vector",
)
