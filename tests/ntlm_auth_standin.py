"""A stand-in for Samba's ``ntlm_auth --request-nt-key`` (the interface FreeRADIUS uses).

    python ntlm_auth_standin.py USERS.json --request-nt-key --allow-mschapv2
        --username=NAME --challenge=HEX8 --nt-response=HEX24 [--domain=D] [--configfile=F]

USERS.json maps a user name to its password, or to {"password": ..., "status":
"c0000071"} for an account the "domain" refuses with that NTSTATUS after a
right password. Prints ``NT_KEY: <MD4(NT hash), 32 hex digits>`` and exits 0
for the right NT-Response, else prints ``Logon failure (0xc000006d)`` (or the
account's status) and exits 1, as ntlm_auth does. The command line is written
to USERS.json + ".args" so that a test can check what mfaserver passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mschap  # noqa: E402  (the test client's maths)


def main(argv: list[str]) -> int:
    users_path, *args = argv
    Path(users_path + ".args").write_text(json.dumps(args))
    options = dict(arg[2:].split("=", 1) for arg in args if "=" in arg)
    if "--request-nt-key" not in args or "--allow-mschapv2" not in args:
        print("stand-in: --request-nt-key --allow-mschapv2 are required")
        return 2
    entry = json.loads(Path(users_path).read_text()).get(options.get("username", ""))
    if isinstance(entry, str):
        entry = {"password": entry}
    if entry is not None:
        password_hash = mschap.nt_password_hash(entry["password"])
        expected = mschap.challenge_response(bytes.fromhex(options["challenge"]), password_hash)
        if expected == bytes.fromhex(options["nt-response"]):
            if "status" in entry:
                print(f"Account problem (0x{entry['status']})")
                return 1
            print("NT_KEY: " + mschap.hash_nt_password_hash(password_hash).hex().upper())
            return 0
    print("Logon failure (0xc000006d)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
