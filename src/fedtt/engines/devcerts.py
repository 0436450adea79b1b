"""Development TLS certificates and SuperNode keys for a Flower deployment (loopback or a test network).

    python -m fedtt.engines.devcerts --out deploy/creds --nodes 3 [--host 10.0.0.5 --host link.example]

writes, under ``--out``:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (P-384, 30 days by default). Give ``ca.crt`` to
  every SuperNode (``--root-certificates``) and to the ``flwr`` CLI (``root-certificates`` in
  ``$FLWR_HOME/config.toml``); keep ``ca.key`` away from everyone.
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for ``127.0.0.1``,
  ``::1``, ``localhost`` and every ``--host`` (``flower-superlink --ssl-certfile server.pem
  --ssl-keyfile server.key --ssl-ca-certfile ca.crt``).
- ``supernode-<i>`` / ``supernode-<i>.pub``, i = 1..N: one EC (P-384) key pair per SuperNode in OpenSSH
  format, what Flower 1.41 expects: the private key goes to ``flower-supernode
  --auth-supernode-private-key``; the public key is registered with ``flwr supernode register <key.pub>``.

Private keys are written with mode 0600. These are development credentials (self-signed CA, no revocation):
use your organisation's PKI for anything real. Only ``cryptography`` (a Flower dependency) is needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # created 0600 from the start, never world-readable
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(hosts) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # de-duplicated, order kept
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate(out: str | Path, nodes: int = 3, hosts=(), days: int = 30, overwrite: bool = False) -> dict[str, Path]:
    """Write a CA, a SuperLink certificate for loopback + ``hosts`` and ``nodes`` SuperNode key pairs.

    Returns the paths: ``ca``, ``server_cert``, ``server_key`` and ``node_keys`` (a list of private key
    paths; each public key is ``<private>.pub``). An existing CA is never replaced unless ``overwrite``: a new
    CA would lock out every site that trusts the old one.
    """
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    out = Path(out)
    if (out / "ca.key").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a CA (ca.key); replacing it locks out every site that trusts "
                              "it: choose another --out, or pass --overwrite")
    now = dt.datetime.now(dt.timezone.utc)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtt development CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid_from).not_valid_after(valid_to)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtt SuperLink")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(valid_from).not_valid_after(valid_to)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_san([*DEFAULT_HOSTS, *hosts]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "server_cert": out / "server.pem",
             "server_key": out / "server.key"}
    _write(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _pem_key(server_key), private=True)
    paths["node_keys"] = [node_key_pair(out / f"supernode-{i}") for i in range(1, nodes + 1)]
    return paths


def node_key_pair(path: str | Path, comment: str = "") -> Path:
    """Write an EC P-384 SuperNode key pair in OpenSSH format: ``path`` (private, 0600), ``path.pub``."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path.with_name(path.name + ".pub"), public + (f" {comment}" if comment else f" {path.name}").encode()
           + b"\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtt.engines.devcerts",
                                     description="Development CA, SuperLink certificate and SuperNode keys.")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to create (default: 3)")
    parser.add_argument("--host", action="append", default=[],
                        help="extra SuperLink host name or IP for the certificate (repeatable); "
                             "127.0.0.1, ::1 and localhost are always included")
    parser.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CA and keys in --out")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, args.nodes, args.host, args.days, args.overwrite)
    except FileExistsError as err:
        print(f"devcerts: error: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate      {paths['ca']}")
    print(f"SuperLink cert/key  {paths['server_cert']}  {paths['server_key']}")
    for key in paths["node_keys"]:
        print(f"SuperNode key pair  {key}  {key}.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
