"""TLS and mutual TLS for device servers and the aggregator, from PEM files.

ServerTLS: the server's certificate and key, plus (for mutual TLS) the CA that client
certificates must chain to; with a client CA, a client without a valid certificate is refused
during the handshake. ClientTLS: the CA that the server's certificate must chain to, plus (for
mutual TLS) the client's own certificate and key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ServerTLS", "ClientTLS"]

PathLike = str | os.PathLike[str]


def _read_pem(path: PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path}: {what} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for a TLS server; `client_ca` turns on mutual TLS (client certificates required)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_args(cls, cert: PathLike | None, key: PathLike | None, client_ca: PathLike | None = None) -> "ServerTLS | None":
        """None when no TLS flag is set; ValueError when they are set inconsistently."""
        if cert is None and key is None and client_ca is None:
            return None
        if cert is None or key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key (got only one of them)")
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        cert = _read_pem(self.cert, "server certificate")
        key = _read_pem(self.key, "server private key")
        client_ca = _read_pem(self.client_ca, "client CA certificate") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """PEM files for a TLS client: `ca` verifies the server; `cert`/`key` identify the client (mTLS).

    `server_name` overrides the name checked against the server certificate (useful when devices
    are reached by IP address but their certificates name a host).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both the certificate and its key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA certificate") if self.ca else None,
            private_key=_read_pem(self.key, "client private key") if self.key else None,
            certificate_chain=_read_pem(self.cert, "client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
