"""make_api_client: which address and which credentials each flag
combination uses, with the service-account directory injected (no real pod,
no network)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.sources.kube import make_api_client

MASTER = "https://172.18.0.1:6443"


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    """A service-account mount as the kubelet lays it out."""
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text("token-one\n")
    (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n")
    return d


def bearer(client: object) -> str | None:
    """The Authorization header value the client would send next."""
    auth = client.configuration.auth_settings()  # type: ignore[attr-defined]
    return auth["BearerToken"]["value"] if "BearerToken" in auth else None


def test_master_alone_in_a_pod_uses_the_service_account_token_and_ca(sa_dir: Path) -> None:
    client = make_api_client(master=MASTER, service_account_dir=sa_dir)
    cfg = client.configuration
    assert cfg.host == MASTER  # --master replaces the address only
    assert cfg.ssl_ca_cert == str(sa_dir / "ca.crt")
    assert bearer(client) == "Bearer token-one"
    client.close()


def test_a_rotated_token_is_picked_up_without_a_restart(sa_dir: Path) -> None:
    client = make_api_client(master=MASTER, service_account_dir=sa_dir)
    assert bearer(client) == "Bearer token-one"
    # The kubelet swaps the file atomically; a new inode is what we see.
    (sa_dir / "token.new").write_text("token-two")
    os.replace(sa_dir / "token.new", sa_dir / "token")
    assert bearer(client) == "Bearer token-two"
    client.close()


def test_master_alone_outside_a_pod_stays_anonymous(tmp_path: Path) -> None:
    client = make_api_client(master=MASTER, service_account_dir=tmp_path / "absent")
    assert client.configuration.host == MASTER
    assert client.configuration.ssl_ca_cert is None
    assert bearer(client) is None
    client.close()


def test_token_is_never_sent_over_plain_http(
    sa_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        client = make_api_client(master="http://127.0.0.1:8080", service_account_dir=sa_dir)
    assert bearer(client) is None
    assert "not sending the token" in caplog.text
    client.close()


def test_missing_ca_falls_back_to_system_cas_with_a_warning(
    sa_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (sa_dir / "ca.crt").unlink()
    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        client = make_api_client(master=MASTER, service_account_dir=sa_dir)
    assert client.configuration.ssl_ca_cert is None
    assert bearer(client) == "Bearer token-one"
    assert "using the system CAs" in caplog.text
    client.close()


def test_no_flags_use_the_in_cluster_config_from_the_same_directory(
    sa_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (sa_dir / "token").write_text("token-one")  # as the kubelet writes it
    client = make_api_client(service_account_dir=sa_dir)
    assert client.configuration.host == "https://10.96.0.1:443"
    assert client.configuration.ssl_ca_cert == str(sa_dir / "ca.crt")
    assert bearer(client) == "bearer token-one"
    client.close()
