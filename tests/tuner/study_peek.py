"""Reading a study that another process is still creating or writing, without racing it."""

from __future__ import annotations

import optuna
import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError


def _storage_complete(storage_url: str) -> bool:
    """Whether optuna has finished creating the storage: its alembic revision is stamped,
    which RDBStorage does last. Checked with plain SQL, which writes nothing."""
    engine = sqlalchemy.create_engine(storage_url)
    try:
        with engine.connect() as connection:
            if not sqlalchemy.inspect(connection).has_table("alembic_version"):
                return False
            stamped = connection.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version"))
            return bool(stamped.scalar())
    finally:
        engine.dispose()


def peek_study(study_name: str, storage_url: str) -> optuna.Study | None:
    """The study as stored now, or None while it does not exist yet, its storage is still
    being created, or the storage is busy.

    Nothing is ever created from here: even with skip_table_creation, an RDBStorage opened on
    a storage without its alembic revision stamps one, and races the `fmtune tune` process
    doing the same (one of the two then fails on a duplicate key). So the storage is opened
    only once it is complete.
    """
    try:
        if not _storage_complete(storage_url):
            return None
        storage = optuna.storages.RDBStorage(
            storage_url, skip_table_creation=True, skip_compatibility_check=True
        )
        return optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return None
