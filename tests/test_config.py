"""Config precedence, sizes, lists and unknown keys."""

import pytest

from semcache.ops.config import Config, ConfigError, load_config, parse_size


class TestConfig:
    def test_precedence_flag_over_env_over_file_over_default(self, tmp_path):
        """flag > env > file > default, key by key."""
        f = tmp_path / "c.toml"
        f.write_text('max_active = 3\nmax_queue = 7\nprefill_chunk = 64\n')
        env = {"SEMCACHE_MAX_ACTIVE": "5", "SEMCACHE_MAX_QUEUE": "9"}
        c = load_config(f, environ=env, overrides={"max_active": 11, "port": None})
        assert (c.max_active, c.max_queue, c.prefill_chunk, c.port) == (11, 9, 64, 8000)

    def test_unknown_key_in_file_is_an_error_naming_it(self, tmp_path):
        """A typo in the file names the key and the file."""
        f = tmp_path / "c.toml"
        f.write_text("max_actve = 3\n")
        with pytest.raises(ConfigError, match="max_actve"):
            load_config(f, environ={})

    def test_unknown_env_key_is_an_error_naming_it(self):
        """An unknown SEMCACHE_* variable is rejected with its name."""
        with pytest.raises(ConfigError, match="SEMCACHE_MAX_ACTVE"):
            load_config(environ={"SEMCACHE_MAX_ACTVE": "1"})

    def test_sizes_and_lists_from_env(self):
        """Sizes take units; lists are comma-separated in env."""
        c = load_config(environ={"SEMCACHE_KV_BUDGET": "512MiB", "SEMCACHE_API_KEYS": "a, b"})
        assert c.kv_budget == 512 << 20
        assert c.api_keys == ["a", "b"]

    def test_env_lists_keep_empty_items(self):
        """An empty item in a comma-separated list is kept (and refused later), never dropped: a
        set SEMCACHE_API_KEYS of "," or "" must not read as "no keys configured"."""
        assert load_config(environ={"SEMCACHE_API_KEYS": ","}).api_keys == ["", ""]
        assert load_config(environ={"SEMCACHE_API_KEYS": ""}).api_keys == [""]
        c = load_config(environ={"SEMCACHE_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"})
        assert c.trusted_proxies == ["127.0.0.1", "10.0.0.0/8"] and c.metrics_key is None

    def test_config_file_from_env(self, tmp_path):
        """SEMCACHE_CONFIG names the file when --config is not given."""
        f = tmp_path / "c.toml"
        f.write_text("max_queue = 4\n")
        assert load_config(environ={"SEMCACHE_CONFIG": str(f)}).max_queue == 4

    def test_bad_values_are_errors(self):
        """Values of the wrong type or range name the key."""
        with pytest.raises(ConfigError, match="max_active"):
            load_config(environ={"SEMCACHE_MAX_ACTIVE": "zero"})
        with pytest.raises(ConfigError, match="max_active"):
            load_config(environ={"SEMCACHE_MAX_ACTIVE": "0"})
        with pytest.raises(ConfigError, match="kv_budget"):
            load_config(environ={"SEMCACHE_KV_BUDGET": "lots"})

    def test_cache_tenant_share_is_a_fraction_or_unset(self):
        """cache_tenant_share: unset by default; a fraction in (0, 1] from env or file; else an error naming it."""
        assert Config().cache_tenant_share is None
        assert load_config(environ={"SEMCACHE_CACHE_TENANT_SHARE": "0.25"}).cache_tenant_share == 0.25
        for bad in ("0", "1.5", "half"):
            with pytest.raises(ConfigError, match="cache_tenant_share"):
                load_config(environ={"SEMCACHE_CACHE_TENANT_SHARE": bad})

    def test_parse_size_units(self):
        """Decimal and binary units."""
        assert parse_size("4GiB") == 4 << 30
        assert parse_size("1.5 MB") == 1_500_000
        assert parse_size(123) == 123

    def test_shipped_example_config_is_valid(self):
        """config/semcache.toml parses and only uses known keys."""
        from pathlib import Path

        path = Path(__file__).parent.parent / "config" / "semcache.toml"
        load_config(path, environ={})


def test_the_makefile_exports_no_semcache_variable_that_is_not_a_config_key():
    """Every SEMCACHE_* variable in the environment is read as a config key (unknown ones stop the
    daemon with exit 2), and `make test` runs every test daemon with the Makefile's exports."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    exported = re.findall(r"^export\s+SEMCACHE_(\w+)", makefile, re.M)
    assert all(name.lower() in Config.__struct_fields__ for name in exported), exported
