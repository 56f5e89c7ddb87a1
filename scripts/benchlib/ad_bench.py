"""Pieces of the ``ad`` benchmark section (issue #11): a Samba AD DC holding the bench
users, and the mfaserver and FreeRADIUS configs that use it over LDAPS.

Used by ``bench.py``; nothing here prints a table. Everything runs on 127.0.0.1
(Samba's LDAP ports 389/636/3268/3269 are fixed: one DC at a time).

* `start_dc` provisions the test suite's domain (``tests/samba_ad.py``), adds
  the bench users to the offline sam.ldb with Samba's own Python (one
  transaction; ~3 ms a user), then starts the DC with the prefork process
  model. Each bench user has the same password and its TOTP seed, base32, in
  ``description``, which the service account may read (FreeRADIUS takes the
  seed from there; mfaserver keeps its own copy in its store).
* `mfaserver_ad_section` is mfaserver's AD setup: [directory] backend "ldap"
  with ``active_directory = true``, LDAPS with the DC's CA file.
* `write_freeradius_config` is ldap_bench's radiusd.conf pointed at the DC:
  ``ldaps://``, the CA file, certificate required, ``sAMAccountName``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ldap_bench import SEED_ATTRIBUTE, b32, suite_helper
from ldap_bench import write_freeradius_config as _write_ldap_freeradius_config

AD_PASSWORD = "Bench-Passw0rd!"  # meets the domain's default complexity rule


def samba_ad():
    """The test suite's ``tests/samba_ad.py`` module (provisioning, starting a DC)."""
    return suite_helper("samba_ad")


def ad_name(i: int) -> str:
    return f"ab{i:06d}"


# Run by Samba's Python on the offline sam.ldb. Samba derives Kerberos keys for a
# cleartext password (~30 ms a user); a simple LDAP bind needs only the NT hash, so
# the hash goes in as is (the "bypass password hash" control, as upgrades use) with
# pwdLastSet = now (the "bypass last set" control; 0 would mean "must change").
# lastLogonTimestamp = now, as for users who signed in recently (a morning of VPN
# logins): a DC writes it at a user's first logon in 9-14 days, and without it the
# first server to log the users in would pay for writes the second one does not.
_ADD_USERS = r'''
import json, sys, time
from samba import unix2nttime
from samba.auth import system_session
from samba.crypto import md4_hash_blob
from samba.dsdb import DSDB_CONTROL_BYPASS_PASSWORD_HASH_OID
from samba.param import LoadParm
from samba.samdb import SamDB

smb_conf, spec_path = sys.argv[1], sys.argv[2]
with open(spec_path) as f:
    spec = json.load(f)
lp = LoadParm()
lp.load(smb_conf)
db = SamDB(url=lp.samdb_url(), session_info=system_session(), lp=lp)
base = db.domain_dn()
nt_hash = md4_hash_blob(spec["password"].encode("utf-16-le"))
last_set = str(unix2nttime(int(time.time())))
controls = ["local_oid:%s:0" % DSDB_CONTROL_BYPASS_PASSWORD_HASH_OID,
            "local_oid:1.3.6.1.4.1.7165.4.3.20:0"]
db.transaction_start()
try:
    for name, seed in spec["users"]:
        db.add({"dn": "CN=%s,CN=Users,%s" % (name, base), "objectClass": "user",
                "sAMAccountName": name, "userPrincipalName": "%s@%s" % (name, spec["realm"]),
                spec["seed_attribute"]: seed, "unicodePwd": nt_hash,
                "userAccountControl": "512", "pwdLastSet": last_set,
                "lastLogonTimestamp": last_set}, controls=controls)
except BaseException:
    db.transaction_cancel()
    raise
db.transaction_commit()
'''


def start_dc(directory: Path, names: list[str], seed_for, timeout: float = 600):
    """Provision a domain in ``directory`` with one user per name, and start its DC.

    Returns ``(samba_ad module, DomainController, setup seconds)``; the caller
    stops the DC. Raises the module's SambaUnavailable when Samba is missing,
    its ports are taken or it does not come up.
    """
    sa = samba_ad()
    began = time.monotonic()
    template = sa.provision(directory / "template")
    spec = directory / "users.json"
    spec.write_text(json.dumps({
        "password": AD_PASSWORD, "realm": sa.REALM.lower(), "seed_attribute": SEED_ATTRIBUTE,
        "users": [(name, b32(seed_for(name))) for name in names]}))
    sa._run([sa.samba_python(), "-c", _ADD_USERS, str(template.path / "etc" / "smb.conf"),
             str(spec)], "adding the bench users", timeout=timeout)
    dc = sa.start_dc(template, directory / "run", model="prefork")
    return sa, dc, time.monotonic() - began


def mfaserver_ad_section(sa, dc) -> str:
    """The [directory] part of an mfaserver config for the bench DC (LDAPS, CA checked)."""
    return (f'[directory]\nbackend = "ldap"\n\n'
            f'[directory.ldap]\nservers = ["{dc.url}"]\nca_file = "{dc.ca_file}"\n'
            f'bind_dn = "{sa.SERVICE_DN}"\nbind_password = "{sa.SERVICE_PASSWORD}"\n'
            f'base_dn = "{sa.BASE_DN}"\nuser_filter = "(sAMAccountName={{username}})"\n'
            f'username_attribute = "sAMAccountName"\nactive_directory = true\n'
            f'ad_domain = "{sa.DOMAIN}"\ntimeout = 5\npool_size = 8\n')


def write_freeradius_config(directory: Path, sa, dc, *, host: str, port: int,
                            secret: str) -> Path:
    """ldap_bench's radiusd.conf (rlm_ldap + rlm_totp) against the DC over LDAPS."""
    tls = ("\t\ttls {\n"
           f'\t\t\tca_file = "{dc.ca_file}"\n'
           '\t\t\trequire_cert = "demand"\n'
           "\t\t}\n")
    return _write_ldap_freeradius_config(
        directory, sa, host=host, port=port, secret=secret, ldap_port=636,
        ldap_server=dc.url, user_attribute="sAMAccountName", tls=tls, section="ad",
        name="a Samba AD DC")

