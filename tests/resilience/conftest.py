import pytest

from atoll.determinism import VirtualClock


@pytest.fixture
def clock():
    return VirtualClock()


@pytest.fixture
def fast_clock():
    """Test mode: sleeps return at once and move the clock."""
    return VirtualClock(auto_advance=True)
