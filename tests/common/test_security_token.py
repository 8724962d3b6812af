"""The write token comes from WRITE_TOKEN or from the file WRITE_TOKEN_FILE names (a Docker or
Kubernetes secret), and a token that cannot be used stops start-up with a message naming it."""

from __future__ import annotations

import pytest

from common.config import ConfigError
from common.security import write_token
from services.gateway.config import GatewayConfig


def test_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("WRITE_TOKEN_FILE", raising=False)
    monkeypatch.setenv("WRITE_TOKEN", "from-env")
    assert write_token() == "from-env"
    monkeypatch.setenv("WRITE_TOKEN", "")
    assert write_token() is None


def test_token_from_a_secret_file(monkeypatch, tmp_path):
    secret = tmp_path / "write_token"
    secret.write_text("  from-file\n")
    monkeypatch.delenv("WRITE_TOKEN", raising=False)
    monkeypatch.setenv("WRITE_TOKEN_FILE", str(secret))
    assert write_token() == "from-file"
    assert GatewayConfig.from_env([]).write_token == "from-file"


@pytest.mark.parametrize(
    "case, message", [("missing", "cannot be read"), ("empty", "is empty"), ("both", "both set")]
)
def test_unusable_token_settings_are_named(monkeypatch, tmp_path, case, message):
    secret = tmp_path / "write_token"
    if case != "missing":
        secret.write_text("\n" if case == "empty" else "t")
    monkeypatch.setenv("WRITE_TOKEN_FILE", str(secret))
    if case == "both":
        monkeypatch.setenv("WRITE_TOKEN", "t")
    else:
        monkeypatch.delenv("WRITE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=message) as caught:
        write_token()
    assert "WRITE_TOKEN" in str(caught.value)
