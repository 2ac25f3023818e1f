from atoll.persistence import SQLiteDatabase
from atoll.testing import DatabaseConformance


class TestSQLiteDatabase(DatabaseConformance):
    async def make_database(self, tmp_path, clock):
        return SQLiteDatabase(tmp_path / "service.db", clock=clock)
