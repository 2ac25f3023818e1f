"""PostgreSQL for a service's database: the same unit of work, on asyncpg."""

from atoll.persistence.postgres._database import PostgresDatabase, translate_placeholders

__all__ = ["PostgresDatabase", "translate_placeholders"]
