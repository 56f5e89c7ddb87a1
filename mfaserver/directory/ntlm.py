"""MS-CHAPv2 against Active Directory without NPS: Samba's ``ntlm_auth``, as FreeRADIUS does it.

``[directory.ad] mschap = "ntlm_auth"``: the machine is joined to the domain
(winbind running); for each MS-CHAPv2 login the reactor spawns (never
blocking, no shell)::

    ntlm_auth --request-nt-key --allow-mschapv2 --username=NAME [--domain=DOMAIN]
              --challenge=HEX8 --nt-response=HEX24 [--configfile=SMB.CONF]

``--challenge`` is the RFC 2759 ChallengeHash of the peer and authenticator
challenges and the user name (without a ``DOMAIN\\`` prefix). On success
ntlm_auth prints ``NT_KEY: <32 hex digits>``: the user session key, which for
NTLM is MD4(NT hash), RFC 2759's PasswordHashHash. From it (SHA-1 only, no
MD4 needed here) mfaserver computes the MS-CHAP2-Success authenticator
response and the MPPE keys of RFC 3079, the reply items the NAS needs. On
failure ntlm_auth exits non-zero and prints the NTSTATUS, which names the
reason (wrong password, expired, disabled, locked...).

Each child has ``timeout`` seconds, then it is killed and the login fails
with `DirectoryUnavailable`; at most ``max_processes`` run at once. Nothing
secret is logged: ntlm_auth's output is parsed, never written out.
"""

from __future__ import annotations

import hashlib
import re

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials
from mfaserver.auth.model import (MPPE_RECV_KEY, MPPE_SEND_KEY, MSCHAP2_SUCCESS, Principal,
                                  Reason, Secret)
from mfaserver.directory.settings import AdConfig

log = Logger(namespace="mfaserver.directory.ntlm")

# RFC 2759 §8.7 and RFC 3079 §3.4.
_MAGIC1 = b"Magic server to client signing constant"
_MAGIC2 = b"Pad to make it do more than one iteration"
_KEY_MAGIC1 = b"This is the MPPE Master Key"
_KEY_MAGIC2 = (b"On the client side, this is the send key; "
               b"on the server side, it is the receive key.")
_KEY_MAGIC3 = (b"On the client side, this is the receive key; "
               b"on the server side, it is the send key.")
_SHS_PAD1 = bytes(40)
_SHS_PAD2 = b"\xf2" * 40

_NT_KEY = re.compile(rb"^NT_KEY: ([0-9A-Fa-f]{32})\s*$", re.MULTILINE)
_NTSTATUS = re.compile(rb"0x(c0000[0-9a-f]{3})", re.IGNORECASE)

# NTSTATUS codes ntlm_auth reports -> why the domain refused ([MS-ERREF] 2.3);
# any other code counts as a wrong password.
NTSTATUS_REASONS = {
    "c000006e": Reason.LOGON_NOT_PERMITTED,   # account restriction
    "c000006f": Reason.LOGON_NOT_PERMITTED,   # outside the logon hours
    "c0000070": Reason.LOGON_NOT_PERMITTED,   # not from this workstation
    "c0000071": Reason.PASSWORD_EXPIRED,
    "c0000072": Reason.ACCOUNT_DISABLED,
    "c0000193": Reason.ACCOUNT_EXPIRED,
    "c0000224": Reason.MUST_CHANGE_PASSWORD,
    "c0000234": Reason.ACCOUNT_LOCKED,
}


def challenge_hash(peer_challenge: bytes, authenticator_challenge: bytes,
                   username: str) -> bytes:
    """RFC 2759 §8.2 ChallengeHash: the 8 octets the NT-Response answers."""
    return hashlib.sha1(peer_challenge + authenticator_challenge
                        + username.encode("utf-8")).digest()[:8]


def authenticator_response(hash_hash: bytes, nt_response: bytes,
                           challenge: bytes) -> bytes:
    """RFC 2759 §8.7: ``S=`` and 40 hex digits, from PasswordHashHash."""
    digest = hashlib.sha1(hash_hash + nt_response + _MAGIC1).digest()
    digest = hashlib.sha1(digest + challenge + _MAGIC2).digest()
    return b"S=" + digest.hex().upper().encode("ascii")


def mppe_keys(hash_hash: bytes, nt_response: bytes) -> tuple[bytes, bytes]:
    """RFC 3079 §3.4: the server's (send, receive) 128-bit MPPE keys."""
    master = hashlib.sha1(hash_hash + nt_response + _KEY_MAGIC1).digest()[:16]
    send = hashlib.sha1(master + _SHS_PAD1 + _KEY_MAGIC3 + _SHS_PAD2).digest()[:16]
    receive = hashlib.sha1(master + _SHS_PAD1 + _KEY_MAGIC2 + _SHS_PAD2).digest()[:16]
    return send, receive


def user_part(username: str) -> str:
    """The name without a ``DOMAIN\\`` prefix (RFC 2759 hashes only this)."""
    return username.rpartition("\\")[2]


def refusal(output: bytes) -> InvalidCredentials:
    """The `InvalidCredentials` for a failed ntlm_auth run that printed ``output``."""
    match = _NTSTATUS.search(output)
    if match is None:
        return InvalidCredentials(Reason.BAD_PASSWORD, "ntlm_auth refused (no NTSTATUS)")
    code = match.group(1).decode().lower()
    return InvalidCredentials(NTSTATUS_REASONS.get(code, Reason.BAD_PASSWORD),
                              f"ntlm_auth NTSTATUS 0x{code}")


class _NtlmAuthRun(ProcessProtocol):
    """One ntlm_auth child: collects its output, fires ``done`` with (exit code, output)."""

    def __init__(self):
        self.done: Deferred = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < 65536:
            self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) else 0
        if not self.done.called:
            self.done.callback((code if code is not None else -1, bytes(self.output)))


class NtlmAuthDirectory:
    """`MsChapDirectory` through ``ntlm_auth --request-nt-key`` (see the module's text).

    ``reactor`` provides IReactorProcess and IReactorTime.
    """

    def __init__(self, config: AdConfig, reactor):
        self.config = config
        self._reactor = reactor
        self.running = 0

    def start(self) -> None:
        """Nothing to open: a child per login."""

    def stop(self) -> None:
        """Children in flight finish or time out on their own."""

    def authenticate_mschap(self, username: str, challenge: bytes,
                            response: bytes) -> Deferred[Principal]:
        return defer.Deferred.fromCoroutine(self._check(username, challenge, response))

    async def _check(self, username: str, challenge: bytes, response: bytes) -> Principal:
        name = user_part(username)
        if not name or any(c in name for c in "\0\n\r") or name.startswith("-"):
            raise InvalidCredentials(Reason.BAD_PASSWORD, "user name ntlm_auth cannot take")
        peer_challenge, nt_response = response[2:18], response[26:50]
        hashed = challenge_hash(peer_challenge, challenge, name)
        code, output = await self._run(name, hashed, nt_response)
        match = _NT_KEY.search(output) if code == 0 else None
        if match is None:
            raise refusal(output)
        hash_hash = bytes.fromhex(match.group(1).decode())
        send, receive = mppe_keys(hash_hash, nt_response)
        success = response[:1] + authenticator_response(hash_hash, nt_response, hashed)
        return Principal(username=name, attributes=(
            (MSCHAP2_SUCCESS, success), (MPPE_SEND_KEY, Secret(send)),
            (MPPE_RECV_KEY, Secret(receive))))

    async def _run(self, name: str, hashed: bytes, nt_response: bytes) -> tuple[int, bytes]:
        config = self.config
        if self.running >= config.max_processes:
            raise DirectoryUnavailable(f"{config.max_processes} ntlm_auth processes running")
        args = [config.ntlm_auth, "--request-nt-key", "--allow-mschapv2",
                f"--username={name}", f"--challenge={hashed.hex()}",
                f"--nt-response={nt_response.hex()}"]
        if config.domain:
            args.append(f"--domain={config.domain}")
        if config.config_file:
            args.append(f"--configfile={config.config_file}")
        run = _NtlmAuthRun()
        try:
            process = self._reactor.spawnProcess(run, config.ntlm_auth, args,
                                                 env={"LANG": "C", "PATH": "/usr/bin:/bin"})
        except OSError as e:
            raise DirectoryUnavailable(f"cannot run {config.ntlm_auth}: {e}") from None
        self.running += 1
        timer = self._reactor.callLater(config.timeout, self._kill, process, run)
        try:
            return await run.done
        finally:
            self.running -= 1
            if timer.active():
                timer.cancel()

    def _kill(self, process, run: _NtlmAuthRun) -> None:
        log.warn("ntlm_auth took longer than {timeout} s: killed", timeout=self.config.timeout)
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
        if not run.done.called:
            run.done.errback(DirectoryUnavailable("ntlm_auth timed out"))
