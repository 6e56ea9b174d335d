"""Profiles, environment overrides, fail-fast start-up and the token helper."""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest

from server import __version__
from server.config import ConfigError, load_settings
from tests.conftest import free_port
from tests.processes import ROOT

TEST_SECRET = "test-secret-0123456789abcdef0123456789"


def run_py(env: dict[str, str], timeout: float = 5) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


def test_unset_profile_means_dev():
    settings = load_settings({})
    assert settings.profile == "dev" and settings.port == 3000


def test_environment_beats_the_profile_file():
    settings = load_settings({"IM_PROFILE": "test", "IM_PORT": "4567", "IM_MONGO_URI": "mongodb://db:1",
                              "IM_DB_NAME": "other", "IM_AUTH_SECRET": "s" * 32})
    assert (settings.port, settings.mongo_uri, settings.db_name, settings.auth_secret) == \
        (4567, "mongodb://db:1", "other", "s" * 32)


@pytest.mark.parametrize("env, fragment", [
    ({"IM_PROFILE": "test", "IM_PORT": "http"}, "IM_PORT"),
    ({"IM_PROFILE": "test", "IM_PORT": "70000"}, "port"),
    ({"IM_PROFILE": "test", "IM_AUTH_SECRET": "short"}, "IM_AUTH_SECRET"),
])
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
    env = {**child_env, "IM_PROFILE": "test", "IM_PORT": str(free_port()), "IM_MONGO_URI": "mongodb://127.0.0.1:9",
           "IM_DB_STARTUP_TIMEOUT_SECS": "1"}
    result, _elapsed = run_py(env, timeout=30)
    assert result.returncode == 1
    assert "cannot use the database" in result.stderr


def test_token_helper_mints_a_verifiable_token(child_env):
    result = subprocess.run([sys.executable, "-m", "server.tokens", "--sub", "Rose", "--role", "doctor"],
                            cwd=ROOT, env={**child_env, "IM_PROFILE": "test"}, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "Rose" and claims["role"] == "doctor" and claims["exp"] > time.time()


def test_version_is_semantic_and_matches_the_package():
    import importlib.metadata
    import re

    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert importlib.metadata.version("im-server") == __version__
