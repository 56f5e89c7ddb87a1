"""Tests for the strict RADIUS codec: RFC vectors, pyrad cross-checks,
hostile packets (security checklist B1/B2) and hypothesis fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad import dictionary as pyrad_dictionary
from pyrad import packet as pyrad_packet

from mfaserver.radius import codec
from mfaserver.radius.codec import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    ACCESS_REQUEST,
    ACCOUNTING_REQUEST,
    CHAP_PASSWORD,
    CLASS,
    EAP_MESSAGE,
    MESSAGE_AUTHENTICATOR,
    NAS_IDENTIFIER,
    NAS_IP_ADDRESS,
    NAS_PORT,
    PROXY_STATE,
    REPLY_MESSAGE,
    STATE,
    STATUS_SERVER,
    USER_NAME,
    USER_PASSWORD,
    VENDOR_MICROSOFT,
    VENDOR_SPECIFIC,
    MalformedPacket,
    Packet,
    decode_request,
    decode_response,
    decrypt_password,
    encode_request,
    encode_response,
    encrypt_password,
    peek_code,
    vsa,
)
from radius_vectors import (
    PYRAD_DICTIONARY,
    RFC2865_ACCESS_ACCEPT,
    RFC2865_ACCESS_REQUEST,
    RFC2865_HIDDEN_PASSWORD,
    RFC2865_REQUEST_AUTHENTICATOR,
    RFC2865_SECRET,
    RFC5997_STATUS_SERVER,
)

SECRET = b"s3cret-shared-with-the-nas"
AUTH = bytes(range(16))


# -- packet builders independent of the codec --------------------------------

def build(code, attributes, *, identifier=7, authenticator=AUTH, secret=None, length=None):
    """Build raw packet bytes from (type, value) pairs, unchecked.

    An attribute (80, None) becomes a Message-Authenticator, signed with
    ``secret`` wherever it sits. ``length`` overrides the Length field.
    """
    body = b""
    ma_offset = None
    for t, value in attributes:
        if t == MESSAGE_AUTHENTICATOR and value is None:
            ma_offset = 20 + len(body) + 2
            value = bytes(16)
        body += bytes((t, len(value) + 2)) + value
    total = 20 + len(body) if length is None else length
    raw = struct.pack("!BBH", code, identifier, total) + authenticator + body
    if ma_offset is not None:
        ma = hmac.new(secret, raw, "md5").digest()
        raw = raw[:ma_offset] + ma + raw[ma_offset + 16:]
    return raw


def hidden(password=b"correct horse", secret=SECRET, authenticator=AUTH):
    return encrypt_password(password, secret, authenticator)


def pap_request(*extra, secret=SECRET):
    """A typical signed PAP Access-Request, M-A first."""
    return build(ACCESS_REQUEST, [
        (MESSAGE_AUTHENTICATOR, None),
        (USER_NAME, b"alice"),
        (USER_PASSWORD, hidden()),
        (NAS_IP_ADDRESS, b"\xc0\x00\x02\x01"),
        (NAS_PORT, b"\x00\x00\x00\x03"),
        (NAS_IDENTIFIER, b"vpn1"),
        *extra,
    ], secret=secret)


def with_tail(packet, tail):
    """Append octets inside the Length field (not as padding)."""
    data = packet + tail
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


def vsa_raw(vendor_id, payload):
    return VENDOR_SPECIFIC, struct.pack("!I", vendor_id) + payload


def assert_dropped(data, reason, **kwargs):
    with pytest.raises(MalformedPacket) as info:
        decode_request(data, SECRET, **kwargs)
    assert reason in info.value.reason


# -- RFC vectors --------------------------------------------------------------

def test_rfc2865_example_request_decodes_for_a_legacy_nas():
    packet = decode_request(
        RFC2865_ACCESS_REQUEST, RFC2865_SECRET, require_message_authenticator=False
    )
    assert (packet.code, packet.identifier) == (ACCESS_REQUEST, 0)
    assert packet.authenticator == RFC2865_REQUEST_AUTHENTICATOR
    assert packet.attributes == (
        (USER_NAME, b"nemo"),
        (USER_PASSWORD, RFC2865_HIDDEN_PASSWORD),
        (NAS_IP_ADDRESS, bytes([192, 168, 1, 16])),
        (NAS_PORT, b"\x00\x00\x00\x03"),
    )
    assert packet.raw == RFC2865_ACCESS_REQUEST


def test_rfc2865_example_password_decrypts_to_arctangent():
    assert decrypt_password(
        RFC2865_HIDDEN_PASSWORD, RFC2865_SECRET, RFC2865_REQUEST_AUTHENTICATOR
    ) == b"arctangent"


def test_rfc2865_example_password_encrypts_to_the_rfc_bytes():
    assert encrypt_password(
        b"arctangent", RFC2865_SECRET, RFC2865_REQUEST_AUTHENTICATOR
    ) == RFC2865_HIDDEN_PASSWORD


def test_rfc2865_example_request_is_dropped_when_message_authenticator_required():
    with pytest.raises(MalformedPacket, match="missing message-authenticator"):
        decode_request(RFC2865_ACCESS_REQUEST, RFC2865_SECRET)


def test_rfc2865_example_accept_passes_the_response_authenticator_check():
    # The reply predates BlastRADIUS: its Response Authenticator verifies,
    # then it is refused only for lacking a Message-Authenticator.
    with pytest.raises(MalformedPacket, match="missing message-authenticator"):
        decode_response(RFC2865_ACCESS_ACCEPT, RFC2865_SECRET, RFC2865_REQUEST_AUTHENTICATOR)
    with pytest.raises(MalformedPacket, match="bad response authenticator"):
        decode_response(RFC2865_ACCESS_ACCEPT, b"wrong", RFC2865_REQUEST_AUTHENTICATOR)


def test_rfc5997_status_server_example_verifies():
    packet = decode_request(RFC5997_STATUS_SERVER, RFC2865_SECRET)
    assert (packet.code, packet.identifier) == (STATUS_SERVER, 0xDA)
    assert packet.has(MESSAGE_AUTHENTICATOR)


def test_rfc5997_status_server_with_wrong_secret_is_dropped():
    with pytest.raises(MalformedPacket, match="bad message-authenticator"):
        decode_request(RFC5997_STATUS_SERVER, b"xyzzy5462")


# -- cross-checks with pyrad as an independent implementation -----------------

@pytest.fixture(scope="module")
def pyrad_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict") / "dictionary"
    path.write_text(PYRAD_DICTIONARY)
    return pyrad_dictionary.Dictionary(str(path))


def pyrad_request(pyrad_dict, password="pässwörd", code=pyrad_packet.AccessRequest):
    request = pyrad_packet.AuthPacket(
        code=code, id=42, secret=SECRET, authenticator=AUTH, dict=pyrad_dict,
        User_Name="alice", NAS_Identifier="vpn1", NAS_IP_Address="192.0.2.1",
    )
    if password is not None:
        request["User-Password"] = request.PwCrypt(password)
    request.AddAttribute("Proxy-State", b"proxy-1")
    request.add_message_authenticator()
    return request


def test_request_built_by_pyrad_is_accepted_and_its_password_revealed(pyrad_dict):
    request = pyrad_request(pyrad_dict)
    packet = decode_request(request.RequestPacket(), SECRET)
    assert packet.identifier == 42
    assert packet.get(USER_NAME) == b"alice"
    assert packet.get(NAS_IP_ADDRESS) == bytes([192, 0, 2, 1])
    assert decrypt_password(
        packet.get(USER_PASSWORD), SECRET, packet.authenticator
    ) == "pässwörd".encode()


def test_status_server_built_by_pyrad_is_accepted(pyrad_dict):
    request = pyrad_packet.AuthPacket(
        code=pyrad_packet.StatusServer, id=9, secret=SECRET, authenticator=AUTH,
        dict=pyrad_dict, NAS_Identifier="vpn1",
    )
    request.add_message_authenticator()
    assert decode_request(request.RequestPacket(), SECRET).code == STATUS_SERVER


@pytest.mark.parametrize("code", [ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE])
def test_pyrad_verifies_our_responses_and_sees_message_authenticator_first(pyrad_dict, code):
    request = pyrad_request(pyrad_dict)
    packet = decode_request(request.RequestPacket(), SECRET)
    attributes = [(REPLY_MESSAGE, b"Enter the code"), (STATE, b"\x01" * 16)]
    attributes += [(PROXY_STATE, value) for value in packet.get_all(PROXY_STATE)]
    raw = encode_response(code, packet, SECRET, attributes)

    reply = pyrad_packet.AuthPacket(packet=raw, secret=SECRET, dict=pyrad_dict)
    assert request.VerifyReply(reply, raw, enforce_ma=True)
    assert raw[20] == MESSAGE_AUTHENTICATOR and raw[21] == 18
    assert reply.code == code
    assert reply["Reply-Message"] == ["Enter the code"]


def test_pyrad_rejects_our_response_under_another_secret(pyrad_dict):
    request = pyrad_request(pyrad_dict)
    raw = encode_response(ACCESS_ACCEPT, (42, AUTH), b"other secret", [])
    reply = pyrad_packet.AuthPacket(packet=raw, secret=SECRET, dict=pyrad_dict)
    assert not request.VerifyReply(reply, raw, enforce_ma=True)


def test_pyrad_accepts_the_message_authenticator_of_our_requests(pyrad_dict):
    raw = encode_request(
        ACCESS_REQUEST, 3, AUTH, SECRET,
        [(USER_NAME, b"bob"), (USER_PASSWORD, hidden(b"pw"))],
    )
    parsed = pyrad_packet.AuthPacket(packet=raw, secret=SECRET, dict=pyrad_dict)
    assert parsed.verify_message_authenticator()
    assert parsed.PwDecrypt(parsed["User-Password"][0]) == "pw"
    assert raw[20] == MESSAGE_AUTHENTICATOR


def test_our_response_decoder_accepts_our_responses():
    request = decode_request(pap_request((PROXY_STATE, b"p")), SECRET)
    raw = encode_response(ACCESS_CHALLENGE, request, SECRET, [(STATE, b"st")])
    reply = decode_response(raw, SECRET, request.authenticator)
    assert (reply.code, reply.identifier) == (ACCESS_CHALLENGE, 7)
    assert reply.attributes[0][0] == MESSAGE_AUTHENTICATOR
    assert reply.attributes[1:] == ((STATE, b"st"),)


def test_response_decoder_drops_tampered_message_authenticator():
    raw = bytearray(encode_response(ACCESS_ACCEPT, (1, AUTH), SECRET, [(CLASS, b"c")]))
    raw[22] ^= 1
    # Fix the Response Authenticator so that only the M-A is wrong.
    raw[4:20] = hashlib.md5(bytes(raw[:4]) + AUTH + bytes(raw[20:]) + SECRET).digest()
    with pytest.raises(MalformedPacket, match="bad message-authenticator"):
        decode_response(bytes(raw), SECRET, AUTH)


def test_response_decoder_drops_request_codes():
    with pytest.raises(MalformedPacket, match="unexpected code 1"):
        decode_response(pap_request(), SECRET, AUTH)


# -- B1: malformed packets ----------------------------------------------------

VALID = pap_request()

MALFORMED = [
    ("10 bytes", VALID[:10], "short packet"),
    ("19 bytes", VALID[:19], "short packet"),
    ("length 19", VALID[:2] + b"\x00\x13" + VALID[4:], "bad length field 19"),
    ("length beyond datagram", build(ACCESS_REQUEST, [], length=100), "beyond datagram"),
    ("length 4097", build(ACCESS_REQUEST, [], length=4097) + bytes(4077), "bad length field"),
    ("65 KB datagram", build(ACCESS_REQUEST, [], length=0xFFFF) + bytes(65515),
     "bad length field"),
    ("code 0", build(0, []), "unexpected code 0"),
    ("code 53", build(53, []), "unexpected code 53"),
    ("code 255", build(255, []), "unexpected code 255"),
    ("accounting-request", build(ACCOUNTING_REQUEST, []), "unexpected code 4"),
    ("access-accept", build(ACCESS_ACCEPT, []), "unexpected code 2"),
    ("attribute length 0", with_tail(VALID, b"\x01\x00"), "attribute 1 length 0"),
    ("attribute length 1", with_tail(VALID, b"\x01\x01"), "attribute 1 length 1"),
    ("lone attribute octet", with_tail(VALID, b"\x01"), "truncated attribute header"),
    ("attribute overflows", with_tail(VALID, b"\x12\x05ab"), "attribute 18 overflows"),
    ("attribute type 0", build(ACCESS_REQUEST, [(0, b"x")]), "attribute type 0"),
    ("201 attributes", build(ACCESS_REQUEST, [(CLASS, b"c")] * 201), "too many attributes"),
    ("1000 two-byte attributes", build(ACCESS_REQUEST, [(CLASS, b"")] * 1000),
     "too many attributes"),
    ("vsa sub-attribute length 0 (pyrad hang)",
     build(ACCESS_REQUEST, [vsa_raw(9, b"\x01\x03A\x02\x00")]), "sub-attribute length 0"),
    ("vsa sub-attribute length 1", build(ACCESS_REQUEST, [vsa_raw(9, b"\x01\x01A")]),
     "sub-attribute length 1"),
    ("vsa sub-attribute overflows", build(ACCESS_REQUEST, [vsa_raw(9, b"\x01\x09AB")]),
     "overflows"),
    ("vsa sub-attribute header truncated", build(ACCESS_REQUEST, [vsa_raw(9, b"\x01\x03A\x02")]),
     "truncated vendor"),
    ("vsa of 5 octets", build(ACCESS_REQUEST, [(VENDOR_SPECIFIC, b"\x00\x00\x00")]),
     "short vendor-specific"),
    ("vsa with a vendor id only", build(ACCESS_REQUEST, [vsa_raw(9, b"")]),
     "short vendor-specific"),
    ("vsa with one payload octet", build(ACCESS_REQUEST, [vsa_raw(9, b"\x01")]),
     "truncated vendor"),
    ("user-password of 5", build(ACCESS_REQUEST, [(USER_PASSWORD, b"ABCDE")]),
     "user-password length 7"),
    ("user-password of 17", build(ACCESS_REQUEST, [(USER_PASSWORD, bytes(17))]),
     "user-password length"),
    ("user-password of 144", build(ACCESS_REQUEST, [(USER_PASSWORD, bytes(144))]),
     "user-password length"),
    ("two user-passwords",
     build(ACCESS_REQUEST, [(USER_PASSWORD, bytes(16)), (USER_PASSWORD, bytes(16))]),
     "repeated attribute 2"),
    ("two user-names", build(ACCESS_REQUEST, [(USER_NAME, b"a"), (USER_NAME, b"b")]),
     "repeated attribute 1"),
    ("two states", build(ACCESS_REQUEST, [(STATE, b"a"), (STATE, b"b")]), "repeated attribute 24"),
    ("empty user-name", build(ACCESS_REQUEST, [(USER_NAME, b"")]), "empty attribute 1"),
    ("empty state", build(ACCESS_REQUEST, [(STATE, b"")]), "empty attribute 24"),
    ("chap-password of 16", build(ACCESS_REQUEST, [(CHAP_PASSWORD, bytes(16))]),
     "attribute 3 length"),
    ("nas-ip-address of 3", build(ACCESS_REQUEST, [(NAS_IP_ADDRESS, bytes(3))]),
     "attribute 4 length"),
    ("message-authenticator of 5", build(ACCESS_REQUEST, [(MESSAGE_AUTHENTICATOR, bytes(5))]),
     "attribute 80 length"),
    ("message-authenticator of 17", build(ACCESS_REQUEST, [(MESSAGE_AUTHENTICATOR, bytes(17))]),
     "attribute 80 length"),
    ("two message-authenticators",
     build(ACCESS_REQUEST, [(MESSAGE_AUTHENTICATOR, bytes(16))] * 2), "repeated attribute 80"),
]


@pytest.mark.parametrize(
    "data, reason", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_packet_is_dropped(data, reason):
    with pytest.raises(MalformedPacket) as info:
        decode_request(data, SECRET, require_message_authenticator=False)
    if reason is not None:
        assert reason in info.value.reason


def test_user_name_overflowing_the_packet_is_dropped():
    # T06: `01 0a 68 69` claims 10 octets with 2 present; pyrad accepts it.
    data = struct.pack("!BBH", ACCESS_REQUEST, 1, 24) + AUTH + b"\x01\x0ahi"
    assert_dropped(data, "overflows packet")


def test_padding_beyond_length_is_ignored():
    packet = decode_request(VALID + b"\x00\x00\x00", SECRET)
    assert packet.raw == VALID
    assert len(packet.attributes) == 6


def test_200_attributes_are_accepted():
    attributes = [(MESSAGE_AUTHENTICATOR, None), (USER_PASSWORD, hidden())]
    attributes += [(CLASS, b"c")] * 198
    packet = decode_request(build(ACCESS_REQUEST, attributes, secret=SECRET), SECRET)
    assert len(packet.attributes) == 200


def test_too_many_vendor_sub_attributes_are_dropped():
    sub_attributes = vsa_raw(9, b"\x01\x02" * 70)
    data = build(ACCESS_REQUEST, [(USER_PASSWORD, hidden())] + [sub_attributes] * 3)
    assert_dropped(data, "too many vendor sub-attributes", require_message_authenticator=False)


def test_user_password_of_16_and_128_octets_is_accepted():
    for size in (16, 128):
        data = build(ACCESS_REQUEST, [(USER_PASSWORD, bytes(size))])
        packet = decode_request(data, SECRET, require_message_authenticator=False)
        assert len(packet.get(USER_PASSWORD)) == size


# -- B2 and RFC 2865 §4.1: authentication and semantics ------------------------

def test_message_authenticator_with_a_flipped_bit_is_dropped():
    data = bytearray(VALID)
    data[25] ^= 0x10
    assert_dropped(bytes(data), "bad message-authenticator")


def test_packet_signed_with_the_wrong_secret_is_dropped():
    assert_dropped(pap_request(secret=b"not the secret"), "bad message-authenticator")


def test_any_tampered_octet_breaks_the_message_authenticator():
    for index in (1, 4, 19, 42, 50, len(VALID) - 1):
        data = bytearray(VALID)
        data[index] ^= 0x01
        assert_dropped(bytes(data), "message-authenticator")


def test_message_authenticator_placed_last_is_accepted():
    data = build(ACCESS_REQUEST, [
        (USER_NAME, b"alice"), (USER_PASSWORD, hidden()), (MESSAGE_AUTHENTICATOR, None),
    ], secret=SECRET)
    assert decode_request(data, SECRET).get(USER_NAME) == b"alice"


def test_request_without_message_authenticator_is_dropped_when_required():
    data = build(ACCESS_REQUEST, [(USER_NAME, b"alice"), (USER_PASSWORD, hidden())])
    assert_dropped(data, "missing message-authenticator")


def test_request_without_message_authenticator_is_accepted_from_legacy_nas():
    data = build(ACCESS_REQUEST, [(USER_NAME, b"alice"), (USER_PASSWORD, hidden())])
    packet = decode_request(data, SECRET, require_message_authenticator=False)
    assert packet.get(USER_NAME) == b"alice"


def test_proxy_state_without_message_authenticator_is_dropped_even_for_legacy_nas():
    data = build(ACCESS_REQUEST, [(USER_PASSWORD, hidden()), (PROXY_STATE, b"p")])
    assert_dropped(data, "proxy-state without message-authenticator",
                   require_message_authenticator=False)


def test_proxy_state_with_message_authenticator_is_kept_in_order():
    packet = decode_request(pap_request((PROXY_STATE, b"one"), (PROXY_STATE, b"two")), SECRET)
    assert packet.get_all(PROXY_STATE) == [b"one", b"two"]


def test_status_server_without_message_authenticator_is_dropped_even_for_legacy_nas():
    data = build(STATUS_SERVER, [(NAS_IDENTIFIER, b"vpn1")])
    assert_dropped(data, "status-server without message-authenticator",
                   require_message_authenticator=False)


def test_status_server_needs_no_password():
    data = build(STATUS_SERVER, [(MESSAGE_AUTHENTICATOR, None)], secret=SECRET)
    assert decode_request(data, SECRET).code == STATUS_SERVER


def test_access_request_without_password_state_or_eap_is_dropped():
    data = build(ACCESS_REQUEST, [(MESSAGE_AUTHENTICATOR, None), (USER_NAME, b"a")],
                 secret=SECRET)
    assert_dropped(data, "no password, state or eap-message")


def test_access_request_with_user_password_and_chap_password_is_dropped():
    data = build(ACCESS_REQUEST, [
        (MESSAGE_AUTHENTICATOR, None), (USER_PASSWORD, hidden()), (CHAP_PASSWORD, bytes(17)),
    ], secret=SECRET)
    assert_dropped(data, "both user-password and chap-password")


@pytest.mark.parametrize("credential", [
    (CHAP_PASSWORD, bytes(17)),
    (STATE, b"challenge-42"),
    (EAP_MESSAGE, b"\x02\x01\x00\x05\x01"),
    vsa(VENDOR_MICROSOFT, 1, bytes(50)),
    vsa(VENDOR_MICROSOFT, 25, bytes(50)),
], ids=["chap", "state", "eap", "ms-chap", "ms-chap2"])
def test_access_request_with_another_credential_is_accepted(credential):
    data = build(ACCESS_REQUEST, [(MESSAGE_AUTHENTICATOR, None), credential], secret=SECRET)
    assert decode_request(data, SECRET).code == ACCESS_REQUEST


def test_ms_chap_challenge_alone_is_no_credential():
    data = build(ACCESS_REQUEST, [
        (MESSAGE_AUTHENTICATOR, None), vsa(VENDOR_MICROSOFT, 11, bytes(16)),
    ], secret=SECRET)
    assert_dropped(data, "no password")


# -- Packet accessors and helpers ---------------------------------------------

def test_packet_accessors():
    packet = decode_request(pap_request(
        (CLASS, b"one"), (CLASS, b"two"),
        vsa(VENDOR_MICROSOFT, 11, b"challenge"),
        (VENDOR_SPECIFIC, struct.pack("!I", 9) + b"\x01\x03a\x02\x04bc"),
    ), SECRET)
    assert packet.get(CLASS) == b"one"
    assert packet.get_all(CLASS) == [b"one", b"two"]
    assert packet.get(STATE) is None and packet.get_all(STATE) == []
    assert packet.has(NAS_PORT) and not packet.has(STATE)
    assert packet.vendor_attributes(VENDOR_MICROSOFT) == [(11, b"challenge")]
    assert packet.vendor_attributes(9) == [(1, b"a"), (2, b"bc")]
    assert packet.vendor_attributes(4846) == []


def test_packet_is_immutable():
    packet = decode_request(VALID, SECRET)
    with pytest.raises(AttributeError):
        packet.code = ACCESS_ACCEPT


def test_peek_code_reads_only_a_full_header():
    assert peek_code(VALID) == ACCESS_REQUEST
    assert peek_code(VALID[:19]) is None
    assert peek_code(b"") is None


def test_vsa_builds_a_single_sub_attribute():
    assert vsa(311, 25, b"xy") == (26, b"\x00\x00\x01\x37\x19\x04xy")
    with pytest.raises(ValueError):
        vsa(311, 25, bytes(248))


def test_encrypt_pads_empty_password_to_one_block():
    assert len(encrypt_password(b"", SECRET, AUTH)) == 16
    assert decrypt_password(encrypt_password(b"", SECRET, AUTH), SECRET, AUTH) == b""


def test_encrypt_refuses_passwords_over_128_octets():
    assert len(encrypt_password(bytes(128), SECRET, AUTH)) == 128
    with pytest.raises(ValueError):
        encrypt_password(b"x" * 129, SECRET, AUTH)


def test_decrypt_with_the_wrong_secret_returns_garbage_without_error():
    garbage = decrypt_password(hidden(b"x" * 40), b"wrong", AUTH)
    assert garbage != b"x" * 40


def test_encode_response_puts_message_authenticator_first_and_computes_authenticators():
    raw = encode_response(ACCESS_REJECT, (99, AUTH), SECRET, [(REPLY_MESSAGE, b"no")])
    assert raw[:4] == struct.pack("!BBH", ACCESS_REJECT, 99, 20 + 18 + 4)
    signed = raw[:4] + AUTH + raw[20:22] + bytes(16) + raw[38:]
    assert raw[22:38] == hmac.new(SECRET, signed, "md5").digest()
    assert raw[4:20] == hashlib.md5(raw[:4] + AUTH + raw[20:] + SECRET).digest()
    assert raw[38:] == b"\x12\x04no"


@pytest.mark.parametrize("attributes", [
    [(REPLY_MESSAGE, bytes(254))],
    [(REPLY_MESSAGE, b"")],
    [(MESSAGE_AUTHENTICATOR, bytes(16))],
    [(0, b"x")],
    [(REPLY_MESSAGE, bytes(253))] * 17,
], ids=["value too long", "empty value", "own m-a", "type 0", "packet too long"])
def test_encode_response_refuses_what_cannot_be_sent(attributes):
    with pytest.raises(ValueError):
        encode_response(ACCESS_ACCEPT, (1, AUTH), SECRET, attributes)


def test_encode_response_fills_a_packet_up_to_4096_octets():
    attributes = [(REPLY_MESSAGE, bytes(253))] * 15 + [(CLASS, bytes(231))]
    assert len(encode_response(ACCESS_ACCEPT, (1, AUTH), SECRET, attributes)) == 4096


def test_encode_response_refuses_request_codes():
    with pytest.raises(ValueError):
        encode_response(ACCESS_REQUEST, (1, AUTH), SECRET, [])


def test_encode_request_without_message_authenticator():
    raw = encode_request(ACCESS_REQUEST, 5, AUTH, SECRET, [(STATE, b"s")],
                         message_authenticator=False)
    assert raw == build(ACCESS_REQUEST, [(STATE, b"s")], identifier=5)


# -- hypothesis ---------------------------------------------------------------

FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
LEGACY_VALID = build(ACCESS_REQUEST, [
    (USER_NAME, b"alice"), (USER_PASSWORD, hidden()),
    vsa(VENDOR_MICROSOFT, 11, b"abc"), (STATE, b"st"), (NAS_PORT, b"\x00\x00\x00\x01"),
])


def decodes_or_is_malformed(data, **kwargs):
    try:
        packet = decode_request(data, SECRET, **kwargs)
    except MalformedPacket as e:
        assert isinstance(e.reason, str) and e.reason
    else:
        assert isinstance(packet, Packet)
        packet.vendor_attributes(VENDOR_MICROSOFT)


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_any_bytes_decode_or_raise_malformed(data, legacy):
    decodes_or_is_malformed(data, require_message_authenticator=not legacy)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([ACCESS_REQUEST, STATUS_SERVER]))
def test_any_body_behind_a_consistent_header_decodes_or_raises_malformed(body, code):
    # A correct header makes the fuzzer reach the attribute walk.
    data = struct.pack("!BBH", code, 1, 20 + len(body)) + AUTH + body
    decodes_or_is_malformed(data, require_message_authenticator=False)


def mutate(packet):
    """Strategy: a valid packet with flipped, cut or inserted octets."""
    flips = st.tuples(st.integers(0, len(packet) - 1), st.integers(1, 255)).map(
        lambda f: packet[:f[0]] + bytes([packet[f[0]] ^ f[1]]) + packet[f[0] + 1:])
    cuts = st.integers(0, len(packet)).map(lambda n: packet[:n])
    # Cut, then repair the Length field so that the attribute walk runs.
    fixed_cuts = st.integers(20, len(packet)).map(
        lambda n: packet[:2] + struct.pack("!H", n) + packet[4:n])
    inserts = st.tuples(st.integers(0, len(packet)), st.binary(min_size=1, max_size=8)).map(
        lambda i: packet[:i[0]] + i[1] + packet[i[0]:])
    inserts_fixed = inserts.map(lambda p: p[:2] + struct.pack("!H", len(p)) + p[4:])
    return st.one_of(flips, cuts, fixed_cuts, inserts, inserts_fixed)


@FUZZ
@given(st.one_of(mutate(VALID), mutate(LEGACY_VALID)), st.booleans())
def test_mutated_packets_decode_or_raise_malformed(data, legacy):
    decodes_or_is_malformed(data, require_message_authenticator=not legacy)


PLAIN_TYPES = st.sampled_from([t for t in range(1, 256) if t not in codec._CHECKED])


@FUZZ
@given(
    st.lists(st.tuples(PLAIN_TYPES, st.binary(min_size=1, max_size=253)), max_size=12),
    st.binary(max_size=128).map(lambda p: p.rstrip(b"\0")),
    st.integers(0, 255),
    st.binary(min_size=16, max_size=16),
)
def test_encoded_request_decodes_to_the_same_attributes(attributes, password, identifier, auth):
    attributes = [(USER_PASSWORD, encrypt_password(password, SECRET, auth))] + attributes
    raw = encode_request(ACCESS_REQUEST, identifier, auth, SECRET, attributes)
    packet = decode_request(raw, SECRET)
    assert packet.attributes[0][0] == MESSAGE_AUTHENTICATOR
    assert list(packet.attributes[1:]) == attributes
    assert (packet.identifier, packet.authenticator, packet.raw) == (identifier, auth, raw)
    assert decrypt_password(packet.get(USER_PASSWORD), SECRET, auth) == password


@FUZZ
@given(
    st.binary(max_size=128).map(lambda p: p.rstrip(b"\0")),
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=16, max_size=16),
)
def test_password_round_trip(password, secret, authenticator):
    hidden_value = encrypt_password(password, secret, authenticator)
    assert len(hidden_value) % 16 == 0 and 16 <= len(hidden_value) <= 128
    assert decrypt_password(hidden_value, secret, authenticator) == password
