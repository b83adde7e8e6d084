"""Nova keeps mailboxes in Postgres."""

__version__ = "0.1.0"
