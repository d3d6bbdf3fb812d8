"""The Burla version and wire protocol number this process states to its peers.

Client, daemon and agents compare them (`burla.schemas.messages.compatible`).

For the test suite only, ``BURLA_TEST_REPORTED_VERSION`` and
``BURLA_TEST_REPORTED_PROTOCOL`` replace them in the process they are set for
and in the processes it starts: that is how a test runs a daemon, agent or
client "of another version". Nothing outside ``tests/`` sets them.
"""

from __future__ import annotations

import os

TEST_VERSION_ENV = "BURLA_TEST_REPORTED_VERSION"
TEST_PROTOCOL_ENV = "BURLA_TEST_REPORTED_PROTOCOL"


def version() -> str:
    """This install's Burla version (``burla.__version__``)."""
    from burla import __version__

    return os.environ.get(TEST_VERSION_ENV) or __version__


def protocol() -> int:
    """The wire protocol this install speaks (``PROTOCOL_VERSION``)."""
    from burla.schemas.messages import PROTOCOL_VERSION

    return int(os.environ.get(TEST_PROTOCOL_ENV) or PROTOCOL_VERSION)
