"""Reading a study that another process is still creating or writing, without racing it."""

from __future__ import annotations

import optuna
from sqlalchemy.exc import SQLAlchemyError


def peek_study(study_name: str, storage_url: str) -> optuna.Study | None:
    """The study as stored now, or None while it does not exist yet, its tables are still
    being created, or its storage is busy.

    Tables are never created from here: a reader that creates them races the `fmtune tune`
    process doing the same (one of the two then fails on 'table already exists').
    """
    try:
        storage = optuna.storages.RDBStorage(
            storage_url, skip_table_creation=True, skip_compatibility_check=True
        )
        return optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return None
