"""Hardware token seed files from vendors (PSKC, CSV), read for `mfaserver token import`."""
