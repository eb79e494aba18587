"""The `processes` fixture: launch scripts started by a test, and everything they started, are gone when it ends."""

import pytest

from tests.launch.helpers import Processes


@pytest.fixture
def processes(tmp_path):
    tracker = Processes(tmp_path)
    try:
        yield tracker
    finally:
        tracker.cleanup()
