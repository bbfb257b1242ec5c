"""Test helpers importable from any tier: `from tests.helpers import wait_until`."""

from tests.conftest import wait_until  # noqa: F401
