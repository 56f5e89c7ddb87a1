"""Small helpers about network addresses, shared by the config and the gateways."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine: "localhost" or a loopback address.

    Used to allow clear text (LDAP binds, gateway credentials) only where it
    never crosses a network.
    """
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
