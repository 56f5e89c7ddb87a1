"""For the unit and the integration tests alike (the servers are in tests/integration/conftest.py).

tests/ is on the import path (pytest's default "prepend" mode): test modules
import the helper modules beside them. Two of those hold assertions (the
contract mixins, the sync checks): pytest rewrites them too, for its
detailed failure messages.
"""

import pytest
from hypothesis import settings

pytest.register_assert_rewrite("cli_setup", "directory_contract")

# No test has a wall-clock bound: Hypothesis's default deadline (200 ms an
# example) fails a property test on a busy machine, not on a wrong property.
settings.register_profile("mfaserver", deadline=None)
settings.load_profile("mfaserver")
