"""Packets to AuthRequests and Decisions to reply attributes."""

import os

from mfaserver.auth.model import Decision, Reason
from mfaserver.radius import codec, translate

SECRET = b"translate-test-secret-0123"


def request(*extra):
    auth = os.urandom(16)
    data = codec.encode_request(codec.ACCESS_REQUEST, 1, auth, SECRET, [
        (codec.USER_NAME, b"alice"),
        (codec.USER_PASSWORD, codec.encrypt_password("pässword".encode(), SECRET, auth)),
        (codec.NAS_IP_ADDRESS, bytes([192, 0, 2, 1])), (codec.CALLING_STATION_ID, b"203.0.113.9"),
        *extra])
    return codec.decode_request(data, SECRET)


def test_request_fields_are_decoded():
    r = translate.to_auth_request(request(), "vpn", SECRET, ("192.0.2.1", 1645))
    assert (r.username, r.password, r.nas_ip, r.calling_station_id, r.source, r.pap) == (
        "alice", "pässword", "192.0.2.1", "203.0.113.9", "192.0.2.1:1645", True)


def test_ms_chap_is_not_pap():
    packet = request(codec.vsa(codec.VENDOR_MICROSOFT, 25, b"x" * 50))
    assert translate.to_auth_request(packet, "vpn", SECRET, ("192.0.2.1", 1)).pap is False


def test_accept_attributes_are_encoded_from_text_and_passed_through_raw():
    decision = Decision.accept(Reason.OK, attributes=[
        ("Filter-Id", "admins"), ("Session-Timeout", "3600"), ("Class", b"\x00\xffraw"),
        ("Framed-IP-Address", "10.0.0.7")])
    attrs = translate.reply_attributes(decision, request((codec.PROXY_STATE, b"p")))
    assert attrs == [(11, b"admins"), (27, (3600).to_bytes(4, "big")), (25, b"\x00\xffraw"),
                     (8, bytes([10, 0, 0, 7])), (codec.PROXY_STATE, b"p")]


def test_reject_carries_only_the_message_and_proxy_state():
    decision = Decision.reject(Reason.BAD_CODE, "Wrong code.")
    attrs = translate.reply_attributes(decision, request((codec.PROXY_STATE, b"p")))
    assert attrs == [(codec.REPLY_MESSAGE, b"Wrong code."), (codec.PROXY_STATE, b"p")]


def test_long_reply_message_is_split_without_breaking_characters():
    chunks = translate.split_text("é" * 300)
    assert all(len(c) <= 253 for c in chunks)
    assert b"".join(chunks).decode("utf-8") == "é" * 300
