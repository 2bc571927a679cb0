"""store.runs: where a run dir's capture store is, the rule the trainer, the export, the
prompt tools and the dashboard share."""

from __future__ import annotations

from store.runs import configured_store, store_may_exist, store_url


def test_store_is_in_the_run_dir_unless_configured(tmp_path):
    run = tmp_path / "run"
    assert store_url(run) == str(run / "capture.zarr")
    assert store_url(run, None) == store_url(run, "") == str(run / "capture.zarr")
    assert store_url(run, "s3://b/r/capture.zarr") == "s3://b/r/capture.zarr"


def test_configured_store_read_from_the_run_config(tmp_path):
    run = tmp_path / "run"
    assert configured_store(run) is None  # no run dir
    run.mkdir()
    assert configured_store(run) is None  # no config.toml
    (run / "config.toml").write_text("[capture]\nevery = 10\n")
    assert configured_store(run) is None  # capture.store unset
    (run / "config.toml").write_text('[capture]\nstore = ""\n')
    assert configured_store(run) is None  # set empty: the default
    (run / "config.toml").write_text('[capture]\nstore = "s3://b/r/capture.zarr"\n')
    assert configured_store(run) == "s3://b/r/capture.zarr"
    (run / "config.toml").write_text("[capture\nstore = ")
    assert configured_store(run) is None  # not TOML: the caller says the store is missing


def test_a_missing_path_is_no_store_and_a_url_may_be_one(tmp_path):
    assert not store_may_exist(str(tmp_path / "capture.zarr"))
    (tmp_path / "capture.zarr").mkdir()
    assert store_may_exist(str(tmp_path / "capture.zarr"))
    assert store_may_exist("s3://b/r/capture.zarr")  # only opening it can tell
