"""The project's exception hierarchy: every error a user can see derives from ProdsearchError."""

from __future__ import annotations


class ProdsearchError(Exception):
    """Base class of every error prodsearch raises on purpose."""


class ConfigError(ProdsearchError):
    """A setting, recipe or command-line option is invalid."""


class CatalogError(ProdsearchError):
    """A catalog file cannot be read at all (as opposed to a single bad row, which is reported)."""


class RowError(ProdsearchError):
    """One catalog row is invalid; carries the row number, the field and the reason."""

    def __init__(self, row: int, field: str, reason: str, product_id: str | None = None) -> None:
        self.row = row
        self.field = field
        self.reason = reason
        self.product_id = product_id
        super().__init__(f"row {row} ({field}): {reason}")


class ImageError(ProdsearchError):
    """An image cannot be read, decoded or is too large."""


class StoreError(ProdsearchError):
    """The vector store failed or is in a state prodsearch cannot use."""


class StoreLockedError(StoreError):
    """The embedded store is already open in another process."""


class CollectionNotFoundError(StoreError):
    """The requested collection does not exist in the store."""


class EncoderMismatchError(StoreError):
    """The collection was written by other encoders than the ones this process would query with."""
