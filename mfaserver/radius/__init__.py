"""The RADIUS edge: strict codec, packet <-> core translation, retransmission cache,
and the UDP protocol that ties them together (protocol code parses, the core decides)."""
