"""The one settings object: defaults, TOML file, environment overrides (env wins)."""

import pytest

from core.config import Settings


def test_toml_then_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "unirs.toml"
    cfg.write_text(
        'max_area_km2 = 50\n[poll]\nlookback_days = 3\n'
        '[[catalogues]]\nname = "local"\nurl = "http://127.0.0.1:8082"\nallowed_schemes = ["http"]\n'
    )
    monkeypatch.setenv("UNIRS_CONFIG", str(cfg))
    monkeypatch.setenv("UNIRS_POLL__LOOKBACK_DAYS", "7")
    s = Settings()
    assert s.max_area_km2 == 50
    assert s.poll.lookback_days == 7  # environment beats the file
    assert s.catalogue("local").allowed_schemes == ["http"]
    assert s.catalogue("local").allow_private_hosts is False  # loopback needs an explicit opt-in
    with pytest.raises(KeyError, match="no catalogue named 'nope'"):
        s.catalogue("nope")


def test_missing_config_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIRS_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="UNIRS_CONFIG"):
        Settings()
