"""The test suite: unit tests of the protocol, integration and fault tests on the real local stack."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
