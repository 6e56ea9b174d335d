"""Profiles, environment overrides, fail-fast start-up and the token helper."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import jwt
import pytest

from server import __version__
from server.config import ConfigError, load_settings
from tests.processes import ROOT, free_port

TEST_SECRET = "test-secret-0123456789abcdef0123456789"


def run_py(env: dict[str, str], timeout: float = 5) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


def test_unset_profile_means_dev():
    settings = load_settings({})
    assert settings.profile == "dev" and settings.port == 3000


def test_environment_beats_the_profile_file():
    settings = load_settings(
        {
            "IM_PROFILE": "test",
            "IM_PORT": "4567",
            "IM_MONGO_URI": "mongodb://db:1",
            "IM_DB_NAME": "other",
            "IM_AUTH_SECRET": "s" * 32,
        }
    )
    assert (settings.port, settings.mongo_uri, settings.db_name, settings.auth_secret) == (
        4567,
        "mongodb://db:1",
        "other",
        "s" * 32,
    )


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"IM_PROFILE": "test", "IM_PORT": "http"}, "IM_PORT"),
        ({"IM_PROFILE": "test", "IM_PORT": "70000"}, "port"),
        ({"IM_PROFILE": "test", "IM_AUTH_SECRET": "short"}, "IM_AUTH_SECRET"),
    ],
)
def test_bad_settings_are_refused(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env)


def test_bogus_profile_exits_non_zero_at_once_with_one_line(child_env):
    result, elapsed = run_py({**child_env, "IM_PROFILE": "bogus"})
    assert result.returncode != 0 and elapsed < 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "bogus" in lines[0] and all(p in lines[0] for p in ("dev", "test", "prod"))


def test_prod_without_a_secret_refuses_to_start(child_env):
    result, elapsed = run_py({**child_env, "IM_PROFILE": "prod"})
    assert result.returncode != 0 and elapsed < 2
    assert "IM_AUTH_SECRET" in result.stderr


def test_unreachable_database_exits_non_zero_with_a_clear_error(child_env):
    env = {
        **child_env,
        "IM_PROFILE": "test",
        "IM_PORT": str(free_port()),
        "IM_MONGO_URI": "mongodb://127.0.0.1:9",
        "IM_DB_STARTUP_TIMEOUT_SECS": "1",
    }
    result, _elapsed = run_py(env, timeout=30)
    assert result.returncode == 1
    assert "cannot use the database" in result.stderr


def test_token_helper_mints_a_verifiable_token(child_env):
    result = subprocess.run(
        [sys.executable, "-m", "server.tokens", "--sub", "Rose", "--role", "doctor"],
        cwd=ROOT,
        env={**child_env, "IM_PROFILE": "test"},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "Rose" and claims["role"] == "doctor" and claims["exp"] > time.time()


def test_version_is_semantic_and_matches_the_package():
    import importlib.metadata
    import re

    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert importlib.metadata.version("im-server") == __version__


@pytest.mark.parametrize(
    "variable, value, fragment",
    [
        ("IM_LIMITS_SEND_RATE_PER_SEC", "fast", "expected a number"),
        ("IM_LIMITS_SEND_RATE_PER_SEC", "0", "greater than 0"),
        ("IM_LIMITS_MAX_FILE_BYTES", "1.5", "expected an integer"),
        ("IM_WEBSOCKET_PING_INTERVAL_SECS", "-3", "greater than 0"),
        ("IM_WRITE_CONCERN_J", "maybe", "true or false"),
        ("IM_ALLOWED_ORIGINS", "https://clinic.example", "JSON list"),
        ("IM_ALLOWED_ORIGINS", '["https://clinic.example", 3]', "JSON list"),
        ("IM_CHANGE_STREAMS", "sometimes", "auto, off"),
        ("IM_LOG_LEVEL", "loud", "DEBUG"),
        ("IM_HTTP_MAX_CONNECTIONS", "0", "at least 1"),
        ("IM_MAX_TOKEN_TTL_SECS", "week", "expected an integer"),
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_variable(variable, value, fragment):
    with pytest.raises(ConfigError) as caught:
        load_settings({"IM_PROFILE": "test", variable: value})
    message = str(caught.value)
    assert variable in message and fragment in message and "\n" not in message, message


def test_every_table_key_and_top_level_key_is_settable_from_the_environment():
    settings = load_settings(
        {
            "IM_PROFILE": "test",
            "IM_LIMITS_SEND_RATE_PER_SEC": "2.5",
            "IM_LIMITS_MAX_CONNECTIONS_PER_USER": "3",
            "IM_WEBSOCKET_PING_INTERVAL_SECS": "9",
            "IM_WEBSOCKET_PING_TIMEOUT_SECS": "4",
            "IM_WRITE_CONCERN_J": "false",
            "IM_WRITE_CONCERN_W": "majority",
            "IM_HTTP_HEADER_TIMEOUT_SECS": "7",
            "IM_LOG_LEVEL": "debug",
            "IM_ACCESS_LOG": "yes",
            "IM_ALLOWED_ORIGINS": '["https://clinic.example", "https://app.example"]',
            "IM_MAX_TOKEN_TTL_SECS": "3600",
        }
    )
    assert settings.limits.send_rate_per_sec == 2.5 and settings.limits.max_connections_per_user == 3
    # The flat names the code uses keep working.
    assert (settings.ping_interval_secs, settings.ping_timeout_secs) == (9.0, 4.0)
    assert (settings.write_concern_j, settings.write_concern_w) == (False, "majority")
    assert settings.http.header_timeout_secs == 7.0
    assert (settings.log_level, settings.access_log) == ("DEBUG", True)
    assert settings.allowed_origins == ("https://clinic.example", "https://app.example")
    assert settings.max_token_ttl_secs == 3600
    assert settings.limits.max_content_chars == 8000  # untouched keys keep the file's value


def test_environment_beats_the_file_and_the_file_beats_the_default(tmp_path):
    (tmp_path / "test.toml").write_text(
        'auth_secret = "file-secret-0123456789"\naccess_log = false\n'
        "[limits]\nsend_burst = 7\nmax_content_chars = 100\n"
    )
    env = {"IM_PROFILE": "test", "IM_LIMITS_SEND_BURST": "9"}
    settings = load_settings(env, conf_dir=tmp_path)
    assert settings.limits.send_burst == 9  # environment
    assert settings.limits.max_content_chars == 100 and settings.access_log is False  # file
    assert settings.limits.send_rate_per_sec == 20.0 and settings.port == 3000  # defaults
    assert load_settings({**env, "IM_ACCESS_LOG": "on"}, conf_dir=tmp_path).access_log is True


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ('auth_secret = "file-secret-0123456789"\nmax_tokens = 3\n', "unknown key max_tokens"),
        (
            'auth_secret = "file-secret-0123456789"\n[limits]\nsend_rate = 3\nburst = 2\n',
            "unknown keys burst, send_rate",
        ),
        ('auth_secret = "file-secret-0123456789"\n[limits]\nsend_burst = "40"\n', "limits.send_burst"),
        ('auth_secret = "file-secret-0123456789"\nlimits = 3\n', "[limits] table"),
        ('auth_secret = "file-secret-0123456789"\n[websocket]\nping_interval_secs = 0\n', "greater than 0"),
    ],
)
def test_unknown_or_ill_typed_keys_in_a_profile_file_are_refused(tmp_path, toml, fragment):
    (tmp_path / "test.toml").write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_settings({"IM_PROFILE": "test"}, conf_dir=tmp_path)


def test_a_bad_variable_stops_start_up_with_exit_2_and_one_line(child_env):
    result, elapsed = run_py({**child_env, "IM_PROFILE": "test", "IM_WEBSOCKET_PING_INTERVAL_SECS": "often"})
    assert result.returncode == 2 and elapsed < 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "IM_WEBSOCKET_PING_INTERVAL_SECS" in lines[0], result.stderr


def test_token_helper_sets_iat_and_refuses_a_ttl_over_the_cap(child_env):
    env = {**child_env, "IM_PROFILE": "test"}
    minted = subprocess.run(
        [sys.executable, "-m", "server.tokens", "--sub", "Rose", "--role", "doctor", "--ttl", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), TEST_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 10

    refused = subprocess.run(
        [sys.executable, "-m", "server.tokens", "--sub", "Rose", "--role", "doctor", "--ttl", str(8 * 24 * 3600)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert "max_token_ttl_secs" in refused.stderr
