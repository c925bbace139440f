"""A throwaway PKI for the TLS tests (trustme): a server CA and a
certificate for 127.0.0.1, and a client CA with one client certificate."""
from __future__ import annotations

from pathlib import Path

import trustme


def make_pki(d: Path, client_name: str) -> dict[str, Path]:
    """Write the PEM files into ``d``: ca, crt, key, client_ca, client (key
    and chain)."""
    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert(client_name)
    out = {"ca": d / "ca.crt", "crt": d / "server.crt", "key": d / "server.key",
           "client_ca": d / "client-ca.crt", "client": d / "client.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    server.cert_chain_pems[0].write_to_path(str(out["crt"]))
    server.private_key_pem.write_to_path(str(out["key"]))
    client_ca.cert_pem.write_to_path(str(out["client_ca"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(out["client"]))
    return out
