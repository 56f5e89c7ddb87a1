"""A real Active Directory for the integration tests: a Samba AD domain controller on 127.0.0.1.

`provision` runs ``samba-tool domain provision`` into a folder and fills the
domain with the test users and groups (`PASSWORDS`, the nested group chain
alice -> vpn-team -> vpn-users); it takes about ten seconds, so the tests do
it once per session. `start_dc` copies that folder, writes an smb.conf that
runs only Samba's LDAP service on 127.0.0.1 (ports 389, 636, 3268, 3269 are
fixed in Samba) with a certificate made here for ``127.0.0.1``/``localhost``,
and starts ``samba --interactive``. Samba in interactive mode exits when its
stdin closes, so a killed test run does not leave a domain controller behind.

The domain:

* realm EXAMPLE.ORG, NetBIOS domain EXAMPLE, base DN DC=example,DC=org;
* alice: password, ``mobile``, member of vpn-team, which is a member of vpn-users;
* bob: disabled; carol: must change her password at next logon (pwdLastSet=0);
  dave: account expired (accountExpires in the past); erin: a password
  settings object locks her out after two bad passwords; frank: password
  expired (last set in 2001); grace: a plain user in no group; mfaserver: the
  service account the directory searches with.

Needs Debian's samba, samba-dsdb-modules, samba-vfs-modules and
samba-ad-provision packages (``scripts/setup-env`` installs them) and root:
the ports are privileged and provisioning stores ACLs in ``security.*`` xattrs.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REALM = "EXAMPLE.ORG"
DOMAIN = "EXAMPLE"
BASE_DN = "DC=example,DC=org"
USERS_DN = f"CN=Users,{BASE_DN}"
HOST = "127.0.0.1"
PORTS = (389, 636, 3268, 3269)  # LDAP, LDAPS, global catalog: what "server services = ldap" binds
ADMIN_PASSWORD = "Admin-Passw0rd!"
SERVICE_USER = "mfaserver"
SERVICE_DN = f"CN={SERVICE_USER},{USERS_DN}"
SERVICE_PASSWORD = "Service-Passw0rd!"

PASSWORDS = {
    "alice": "Alice-Passw0rd!",
    "bob": "Bob-Passw0rd!",
    "carol": "Carol-Passw0rd!",
    "dave": "Dave-Passw0rd!",
    "erin": "Erin-Passw0rd!",
    "frank": "Frank-Passw0rd!",
    "grace": "Grace-Passw0rd!",
    SERVICE_USER: SERVICE_PASSWORD,
}
ALICE_MOBILE = "+15555550101"
VPN_TEAM_DN = f"CN=vpn-team,{USERS_DN}"
VPN_USERS_DN = f"CN=vpn-users,{USERS_DN}"

PACKAGES = "samba samba-dsdb-modules samba-vfs-modules samba-ad-provision"

# Run by Samba's own Python (the interpreter of samba-tool) on the offline
# sam.ldb: one process instead of a dozen samba-tool calls, and it can set the
# attributes samba-tool has no option for (mobile, accountExpires, PSOs).
_POPULATE = r'''
import json, sys
import ldb
from samba import dsdb, unix2nttime
from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB

smb_conf, spec = sys.argv[1], json.loads(sys.argv[2])
lp = LoadParm()
lp.load(smb_conf)
db = SamDB(url=lp.samdb_url(), session_info=system_session(), lp=lp)
base = db.domain_dn()
users = "CN=Users,%s" % base

for name, password in spec["passwords"].items():
    db.newuser(name, password, givenname=name.capitalize(), surname="Test")

def modify(dn, **attrs):
    m = ldb.Message(ldb.Dn(db, dn))
    for key, value in attrs.items():
        m[key] = ldb.MessageElement(str(value), ldb.FLAG_MOD_REPLACE, key)
    db.modify(m)

modify("CN=alice,%s" % users, mobile=spec["alice_mobile"])
db.disable_account("(sAMAccountName=bob)")
db.force_password_change_at_next_login("(sAMAccountName=carol)")
modify("CN=dave,%s" % users, accountExpires=unix2nttime(1000000000))  # 2001-09-09

db.newgroup("vpn-team")
db.newgroup("vpn-users")
db.add_remove_group_members("vpn-team", ["alice"])
db.add_remove_group_members("vpn-users", ["vpn-team"])

# Fine-grained password policies (intervals are negative, in 100 ns units).
MINUTE = 60 * 10**7
def pso(name, applies_to, threshold):
    db.add({
        "dn": "CN=%s,CN=Password Settings Container,CN=System,%s" % (name, base),
        "objectClass": "msDS-PasswordSettings",
        "msDS-PasswordSettingsPrecedence": "1",
        "msDS-PasswordReversibleEncryptionEnabled": "FALSE",
        "msDS-PasswordHistoryLength": "0",
        "msDS-PasswordComplexityEnabled": "FALSE",
        "msDS-MinimumPasswordLength": "1",
        "msDS-MinimumPasswordAge": "0",
        "msDS-MaximumPasswordAge": str(-42 * 24 * 60 * MINUTE),
        "msDS-LockoutThreshold": str(threshold),
        "msDS-LockoutObservationWindow": str(-30 * MINUTE),
        "msDS-LockoutDuration": str(-30 * MINUTE),
        "msDS-PSOAppliesTo": "CN=%s,%s" % (applies_to, users),
    })
pso("lock-erin-quickly", "erin", 2)

# frank's password was last set in 2001, so the domain's maximum password age
# (42 days) has passed. Only the "bypass last set" control (the one upgrades
# use to import passwords) lets pwdLastSet be anything but 0 or now.
m = ldb.Message(ldb.Dn(db, "CN=frank,%s" % users))
m["clearTextPassword"] = ldb.MessageElement(spec["passwords"]["frank"].encode("utf-16-le"),
                                            ldb.FLAG_MOD_REPLACE, "clearTextPassword")
m["pwdLastSet"] = ldb.MessageElement(str(unix2nttime(1000000000)), ldb.FLAG_MOD_REPLACE,
                                     "pwdLastSet")
db.modify(m, controls=["local_oid:1.3.6.1.4.1.7165.4.3.20:0"])
'''


class SambaUnavailable(Exception):
    """Samba is missing or cannot run here; the message says what to do."""


def _find(command: str) -> str:
    # samba lives in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which(command, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None or not Path("/usr/share/samba/setup/provision.ldif").exists():
        raise SambaUnavailable(f"Samba AD DC is not installed: run scripts/setup-env "
                               f"(apt-get install {PACKAGES})")
    return found


def samba_tool() -> str:
    return _find("samba-tool")


def samba_binary() -> str:
    return _find("samba")


def samba_python() -> str:
    """The interpreter that has Samba's Python bindings: the one samba-tool runs with."""
    first = Path(samba_tool()).read_text(errors="replace").splitlines()[0]
    if not first.startswith("#!"):
        return "/usr/bin/python3"
    return first[2:].split()[0]


def _run(args: list[str], what: str, timeout: float = 180) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        hint = "" if os.geteuid() == 0 else " (not root: provisioning a DC needs root)"
        raise SambaUnavailable(f"{what} failed (exit {result.returncode}){hint}: "
                               f"{' '.join(args[:3])} ...\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def write_certificates(tls_dir: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 and localhost; returns the CA file."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mfaserver test AD CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    (tls_dir / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tls_dir / "cert.pem").write_bytes(cert.public_bytes(pem))
    key_path = tls_dir / "key.pem"
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)   # Samba refuses a key file others can read
    return tls_dir / "ca.pem"


def write_smb_conf(dc: Path, winbind: bool = False) -> Path:
    """The smb.conf for ``dc`` (a provisioned folder): LDAP only, on 127.0.0.1 only.

    ``winbind``: also run the DC's winbindd and allow MS-CHAPv2, so that
    Samba's ``ntlm_auth`` on this machine checks MS-CHAPv2 logins against the
    domain (what FreeRADIUS on a Samba DC does). winbindd listens on the
    compiled-in /run/samba/winbindd, where ntlm_auth looks (libwbclient
    ignores the smb.conf's socket directory), so one such DC runs at a time.
    """
    (dc / "run").mkdir(exist_ok=True)
    conf = dc / "etc" / "smb.conf"
    conf.write_text(f"""\
# Written by tests/samba_ad.py: an AD DC that serves only LDAP, only on {HOST}.
[global]
    netbios name = DC1
    realm = {REALM}
    workgroup = {DOMAIN}
    server role = active directory domain controller
    server services = ldap
    interfaces = {HOST}
    bind interfaces only = yes
    private dir = {dc}/private
    lock directory = {dc}
    state directory = {dc}/state
    cache directory = {dc}/cache
    binddns dir = {dc}/bind-dns
    pid directory = {dc}/run
    ncalrpc dir = {dc}/run/ncalrpc
    log level = 1
    idmap_ldb:use rfc2307 = yes
    tls enabled = yes
    tls keyfile = {dc}/tls/key.pem
    tls certfile = {dc}/tls/cert.pem
    tls cafile = {dc}/tls/ca.pem
""")
    if winbind:
        text = conf.read_text().replace("server services = ldap",
                                        "server services = ldap, winbindd")
        conf.write_text(text + "    ntlm auth = mschapv2-and-ntlmv2-only\n")
    return conf


@dataclass(frozen=True)
class Template:
    """A provisioned and populated domain, ready to be copied and started."""

    path: Path
    seconds: float      # how long provisioning and populating took


def provision(directory: Path) -> Template:
    """Provision the test domain into ``directory``/dc and add the test users and groups."""
    began = time.monotonic()
    tool = samba_tool()
    dc = directory / "dc"
    _run([tool, "domain", "provision", f"--realm={REALM}", f"--domain={DOMAIN}",
          "--server-role=dc", "--dns-backend=NONE", "--use-rfc2307", "--host-name=dc1",
          f"--adminpass={ADMIN_PASSWORD}", f"--targetdir={dc}",
          f"--option=interfaces={HOST}", "--option=bind interfaces only = yes"],
         "samba-tool domain provision")
    conf = write_smb_conf(dc)
    spec = {"passwords": PASSWORDS, "alice_mobile": ALICE_MOBILE}
    _run([samba_python(), "-c", _POPULATE, str(conf), json.dumps(spec)], "populating the domain")
    return Template(dc, time.monotonic() - began)


def port_holder(port: int) -> str | None:
    """None if ``port`` is free on 127.0.0.1, else what holds it (best effort)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return None
        except OSError as e:
            reason = str(e)
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or reason


@dataclass
class DomainController:
    """A running Samba AD DC: where it listens and how to stop it."""

    path: Path
    proc: subprocess.Popen
    log_path: Path
    ca_file: Path
    started_seconds: float

    url = f"ldaps://{HOST}"
    plain_url = f"ldap://{HOST}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def _ldaps_ready(ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((HOST, 636), timeout=1) as raw:
            with context.wrap_socket(raw, server_hostname=HOST):
                return True
    except (OSError, ssl.SSLError):
        return False


def start_dc(template: Template, directory: Path, timeout: float = 60,
             winbind: bool = False, model: str = "single") -> DomainController:
    """Copy ``template`` into ``directory`` and start Samba there; wait until LDAPS answers.

    ``model``: Samba's process model; "single" (one process, the tests' choice) or
    "prefork" (a pool of LDAP server processes, as a production DC runs).
    """
    began = time.monotonic()
    busy = {port: holder for port in PORTS if (holder := port_holder(port))}
    if busy:
        raise SambaUnavailable(
            "the Samba AD DC needs these ports on 127.0.0.1, which are taken "
            "(a system slapd or samba? stop it: service slapd stop; service samba-ad-dc stop):\n"
            + "\n".join(f"  {port}: {holder}" for port, holder in busy.items()))
    dc = directory / "dc"
    shutil.copytree(template.path, dc, symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock", "ldapi", "msg.lock", "run"))
    conf = write_smb_conf(dc, winbind)
    ca_file = write_certificates(dc / "tls")
    log_path = directory / "samba.log"
    with open(log_path, "w") as log:
        # stdin is a pipe we hold: "samba -i" exits when it closes, even if we are killed.
        proc = subprocess.Popen([samba_binary(), "--interactive", f"--model={model}",
                                 "--debug-stdout", "-s", str(conf)],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    controller = DomainController(dc, proc, log_path, ca_file, 0.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SambaUnavailable(f"samba exited with status {proc.returncode}:\n"
                                   f"{controller.log_text()[-5000:]}")
        if _ldaps_ready(ca_file):
            controller.started_seconds = time.monotonic() - began
            return controller
        time.sleep(0.1)
    controller.stop()
    raise SambaUnavailable(f"samba did not answer LDAPS on {HOST}:636 within {timeout} s:\n"
                           f"{controller.log_text()[-5000:]}")
