"""Study storage URLs: the documented ``postgresql://user:pw@host/db`` form with whichever driver is installed.

SQLAlchemy picks the driver of a bare ``postgresql://`` URL itself, and its choice changed: psycopg2
up to SQLAlchemy 2.0, psycopg (3) from 2.1. A URL that names no driver therefore fails on a machine
that has the other one ("No module named psycopg2"). :func:`storage_url` keeps the URL when
SQLAlchemy's default driver imports and otherwise names one that does (``postgresql+psycopg://`` or
``postgresql+psycopg2://``); with none it is one line naming the extra that installs it
(``pip install 'augment[postgres]'``). ``postgres://`` (the short form some hosts print) is read as
``postgresql://``. A URL that names its driver, and every other database, is left as given.
"""

from __future__ import annotations

import importlib
from typing import Any

from augment.errors import UserError

#: PostgreSQL drivers SQLAlchemy knows, in the order tried when its default one is missing.
POSTGRES_DRIVERS = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))
EXTRA = "pip install 'augment[postgres]'"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _default_driver_imports(url: Any) -> bool:
    """Whether SQLAlchemy's own driver for ``url`` (no ``+driver`` in it) imports here."""
    try:
        url.get_dialect().import_dbapi()
    except ImportError:
        return False
    return True


def storage_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed; other URLs unchanged (see the module doc)."""
    from sqlalchemy.engine import make_url

    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if not url.startswith("postgresql://"):
        return url  # sqlite, mysql, or postgresql+driver:// as the user chose
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparsable: the storage reports it (with the password hidden)
        return url
    if _default_driver_imports(parsed):
        return url
    for driver, module in POSTGRES_DRIVERS:
        if _importable(module):
            return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    raise UserError(f"--storage {parsed.render_as_string(hide_password=True)}: no PostgreSQL driver is installed: "
                    f"{EXTRA} (psycopg 3), or name an installed driver as postgresql+<driver>://")
