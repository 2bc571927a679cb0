"""Where a run dir's capture store is: one rule for the trainer, the export, the prompt
tools and the dashboard. A run writes its store to RUN/capture.zarr unless it was trained
with `capture.store` set (an fsspec URL such as s3://bucket/run/capture.zarr, or a path);
that setting is in the run's config.toml, which the trainer writes at its start."""

from __future__ import annotations

import tomllib
from pathlib import Path

STORE_DIR = "capture.zarr"
CONFIG_FILE = "config.toml"


def store_url(run_dir: str | Path, configured: str | None = None) -> str:
    """The run's store: `configured` (its capture.store) when set, else RUN/capture.zarr,
    the run dir as given now, so a run dir that was moved still finds its store."""
    return configured or str(Path(run_dir) / STORE_DIR)


def store_may_exist(url: str) -> bool:
    """False for a local path that is not there; True for a URL (s3://...), which only
    opening it can tell, and for a path that is."""
    return "://" in url or Path(url).exists()


def configured_store(run_dir: str | Path) -> str | None:
    """The `capture.store` in the run's config.toml, or None when it is unset or there is
    no readable config. Read as plain TOML: `store` does not know the trainer's config."""
    try:
        with open(Path(run_dir) / CONFIG_FILE, "rb") as f:
            return str((tomllib.load(f).get("capture") or {}).get("store") or "") or None
    except (OSError, ValueError):  # no config, or not TOML: the caller says what is missing
        return None
