"""mfaserver: an on-premises RADIUS multi-factor authentication server."""
