import pytest

from support import System


@pytest.fixture
async def system(tmp_path):
    s = System(tmp_path)
    yield s
    await s.stop()
