"""A real OpenLDAP slapd on 127.0.0.1 for the LDAP tests, and broken servers to fail over from.

`start_slapd` writes a slapd.conf and an LDIF into a folder, loads the LDIF
with slapadd (offline, fast) and runs slapd in the foreground, listening on
a free ldap:// port (StartTLS available) and a free ldaps:// port. The
directory holds:

* ``uid=user000`` .. ``uid=user299`` under ``ou=people``, password
  `user_password(i)`; ``user000`` has a mobile number;
* ``uid=dup`` twice, under ``ou=people`` and ``ou=staff`` (an ambiguous name);
* ``cn=vpn-users`` (users 000-099) and ``cn=admins`` (users 000, 001) under
  ``ou=groups``, groupOfNames;
* the service account ``cn=mfaserver,ou=services``, which may read every
  entry (not passwords), while anonymous may only bind;
* ``uid=public`` under ``ou=public``, the one entry anonymous may read.

`make_certificates` makes a CA, a server certificate for 127.0.0.1 signed by
it, one for a wrong host name, and an unrelated CA that trusts none of them.
`HungServer` accepts TCP connections and never answers (or closes them at
once); `dead_url` is a port where nothing listens; `RecordingProxy` relays to
slapd and keeps what the client sent, to check what went over the wire.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
MODULE_DIR = "/usr/lib/ldap"
# Debian ships the schema files as conffiles in /etc/ldap/schema; other
# layouts put them next to the binaries.
SCHEMA_DIRS = ("/etc/ldap/schema", "/usr/local/etc/openldap/schema", "/etc/openldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")

BASE_DN = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PASSWORD = "root-secret"
SERVICE_DN = f"cn=mfaserver,ou=services,{BASE_DN}"
SERVICE_PASSWORD = "service-secret"
PEOPLE_DN = f"ou=people,{BASE_DN}"
VPN_GROUP = f"cn=vpn-users,ou=groups,{BASE_DN}"
ADMINS_GROUP = f"cn=admins,ou=groups,{BASE_DN}"
PUBLIC_DN = f"ou=public,{BASE_DN}"
USER_COUNT = 300
VPN_MEMBERS = range(100)
ADMIN_MEMBERS = (0, 1)
MOBILE = "+15555550100"  # user000's
DUP_PASSWORD = "dup-secret"
PUBLIC_PASSWORD = "public-secret"


def available() -> bool:
    """Whether slapd and its schema files are installed."""
    return (os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)
            and schema_dir() is not None)


def schema_dir() -> Path | None:
    for candidate in SCHEMA_DIRS:
        if all((Path(candidate) / f"{name}.schema").is_file() for name in SCHEMAS):
            return Path(candidate)
    return None


def user_dn(i: int) -> str:
    return f"uid=user{i:03d},{PEOPLE_DN}"


def user_password(i: int) -> str:
    return f"pw-{i:03d}-secret"


def ssha(password: str) -> str:
    """An RFC 2307 {SSHA} userPassword value, as slappasswd makes it."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_url() -> str:
    """An ldap:// URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"ldap://127.0.0.1:{free_tcp_port()}"


# --- Certificates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    ca_file: Path          # the CA that signed both server certificates
    cert_file: Path        # for 127.0.0.1 and localhost
    key_file: Path
    wrong_cert_file: Path  # signed by the CA, but for wrong.example only
    wrong_key_file: Path
    other_ca_file: Path    # a CA that signed none of them


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _write_cert(path: Path, cert) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _server_cert(ca_key, ca_cert, names: list[x509.GeneralName]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slapd test")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("mfaserver test CA")
    _, other_ca_cert = _ca("someone else's CA")
    key, cert = _server_cert(ca_key, ca_cert, [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                               x509.DNSName("localhost")])
    wrong_key, wrong_cert = _server_cert(ca_key, ca_cert, [x509.DNSName("wrong.example")])
    certs = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                         directory / "wrong.pem", directory / "wrong.key",
                         directory / "other-ca.pem")
    _write_cert(certs.ca_file, ca_cert)
    _write_cert(certs.cert_file, cert)
    _write_key(certs.key_file, key)
    _write_cert(certs.wrong_cert_file, wrong_cert)
    _write_key(certs.wrong_key_file, wrong_key)
    _write_cert(certs.other_ca_file, other_ca_cert)
    return certs


# --- slapd -------------------------------------------------------------------------------------

def _entry(dn: str, **attributes) -> str:
    lines = [f"dn: {dn}"]
    for name, values in attributes.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            lines.append(f"{name}: {value}")
    return "\n".join(lines) + "\n"


def _person(dn: str, uid: str, password: str, **extra) -> str:
    return _entry(dn, objectClass=["inetOrgPerson"], uid=uid, cn=uid, sn=uid,
                  userPassword=ssha(password), **extra)


def make_ldif() -> str:
    entries = [
        _entry(BASE_DN, objectClass=["dcObject", "organization"], dc="example", o="Example"),
        *(_entry(f"ou={ou},{BASE_DN}", objectClass="organizationalUnit", ou=ou)
          for ou in ("people", "staff", "groups", "services", "public")),
        _entry(SERVICE_DN, objectClass=["organizationalRole", "simpleSecurityObject"],
               cn="mfaserver", userPassword=ssha(SERVICE_PASSWORD)),
    ]
    for i in range(USER_COUNT):
        extra = {"mobile": MOBILE} if i == 0 else {}
        entries.append(_person(user_dn(i), f"user{i:03d}", user_password(i), **extra))
    entries.append(_person(f"uid=dup,{PEOPLE_DN}", "dup", DUP_PASSWORD))
    entries.append(_person(f"uid=dup,ou=staff,{BASE_DN}", "dup", DUP_PASSWORD))
    entries.append(_person(f"uid=public,{PUBLIC_DN}", "public", PUBLIC_PASSWORD))
    entries.append(_entry(VPN_GROUP, objectClass="groupOfNames", cn="vpn-users",
                          member=[user_dn(i) for i in VPN_MEMBERS]))
    entries.append(_entry(ADMINS_GROUP, objectClass="groupOfNames", cn="admins",
                          member=[user_dn(i) for i in ADMIN_MEMBERS]))
    return "\n".join(entries)


def make_config(directory: Path, schemas: Path, tls: tuple[Path, Path, Path] | None) -> str:
    lines = [f"include {schemas / name}.schema" for name in SCHEMAS]
    lines += [
        f"modulepath {MODULE_DIR}",
        "moduleload back_mdb",
        f"pidfile {directory / 'slapd.pid'}",
        f"argsfile {directory / 'slapd.args'}",
        "threads 8",
    ]
    if tls:
        ca, cert, key = tls
        lines += [f"TLSCACertificateFile {ca}", f"TLSCertificateFile {cert}",
                  f"TLSCertificateKeyFile {key}"]
    lines += [
        "database mdb",
        f'suffix "{BASE_DN}"',
        f'rootdn "{ROOT_DN}"',
        f"rootpw {ROOT_PASSWORD}",
        f"directory {directory / 'db'}",
        "maxsize 104857600",
        "index objectClass,uid,member eq",
        # Anyone may bind with a password; nobody reads the hashes.
        "access to attrs=userPassword",
        "    by anonymous auth",
        "    by * none",
        # Anonymous users may read the public subtree only (to test anonymous
        # search), and the base entry so that a search from there finds it.
        f'access to dn.base="{BASE_DN}"',
        "    by * read",
        f'access to dn.subtree="{PUBLIC_DN}"',
        f'    by dn.exact="{SERVICE_DN}" read',
        "    by anonymous read",
        "    by * none",
        "access to *",
        f'    by dn.exact="{SERVICE_DN}" read',
        "    by * none",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Slapd:
    """A running slapd. ``url`` is plain LDAP (StartTLS works), ``ldaps_url`` LDAP over TLS."""

    directory: Path
    port: int
    ldaps_port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_slapd(directory: Path, tls: tuple[Path, Path, Path] | None = None,
                timeout: float = 10.0) -> Slapd:
    """Load the test data and start slapd in ``directory``.

    ``tls`` is (CA file, certificate file, key file). Returns once slapd
    accepts connections; raises RuntimeError (with slapd's output) otherwise.
    """
    schemas = schema_dir()
    if schemas is None:
        raise RuntimeError(f"no OpenLDAP schema files in {SCHEMA_DIRS}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir(exist_ok=True)
    conf = directory / "slapd.conf"
    conf.write_text(make_config(directory, schemas, tls))
    ldif = directory / "data.ldif"
    ldif.write_text(make_ldif())
    subprocess.run([SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)], check=True,
                   capture_output=True)
    port, ldaps_port = free_tcp_port(), free_tcp_port()
    log = open(directory / "slapd.log", "wb")
    # -d 0: stay in the foreground (so the process is ours to stop) without debug output.
    process = subprocess.Popen(
        [SLAPD, "-d", "0", "-f", str(conf),
         "-h", f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{ldaps_port}/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = Slapd(directory, port, ldaps_port, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.02)
    server.stop()
    output = (directory / "slapd.log").read_text(errors="replace")
    raise RuntimeError(f"slapd did not start (exit {process.returncode}):\n{output}")


# --- Servers that misbehave, and a relay that records --------------------------------------------

class _Listener:
    """A TCP listener on 127.0.0.1 handing each accepted connection to ``handle`` in a thread."""

    def __init__(self, name: str):
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.port = self._socket.getsockname()[1]
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)

    def drop_connections(self) -> None:
        """Close every accepted connection (as a server does with idle clients)."""
        with self._lock:
            connections, self._open = self._open, []
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self.drop_connections()


class HungServer(_Listener):
    """Accepts TCP connections and never answers (or, with ``hang=False``, closes them at once).

    ``connections`` counts accepted connections, ``received`` the bytes read.
    """

    def __init__(self, hang: bool = True):
        self._hang = hang
        self.received = 0
        super().__init__("hung-ldap")

    def handle(self, conn: socket.socket) -> None:
        if not self._hang:
            conn.close()
            return
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.received += len(data)


class RecordingProxy(_Listener):
    """Relays connections to 127.0.0.1:``port`` and records every byte clients send."""

    def __init__(self, port: int):
        self._target = port
        self.sent = bytearray()
        super().__init__("ldap-proxy")

    def handle(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self._target))
        except OSError:
            conn.close()
            return
        self._track(upstream)
        threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()
        self._pump(conn, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.sent += data
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
