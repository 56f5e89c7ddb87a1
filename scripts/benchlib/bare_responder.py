"""A bare RADIUS responder: the floor for what Twisted + pyrad can do.

Answers every Status-Server with an Access-Accept carrying a
Message-Authenticator, and nothing else: no client check, no Message-
Authenticator check on the request, no retransmission cache. scripts/bench
compares mfaserver's front end against it.

    python bare_responder.py --port 18120 --secret s3cret [--dictionary FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

from pyrad import packet
from pyrad.dictionary import Dictionary
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol


class BareResponder(DatagramProtocol):
    """Decode with pyrad, answer Status-Server with Access-Accept, drop the rest."""

    def __init__(self, secret: bytes, dictionary: Dictionary):
        self.secret = secret
        self.dictionary = dictionary

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            request = packet.Packet(packet=data, dict=self.dictionary, secret=self.secret)
        except Exception:
            return
        if request.code != packet.StatusServer:
            return
        reply = request.CreateReply(code=packet.AccessAccept)
        reply.add_message_authenticator()
        self.transport.write(reply.ReplyPacket(), addr)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--dictionary", default=os.path.join(here, "dictionary"))
    args = parser.parse_args()
    responder = BareResponder(args.secret.encode(), Dictionary(args.dictionary))
    reactor.listenUDP(args.port, responder, interface=args.host)
    print(f"bare responder on {args.host}:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
