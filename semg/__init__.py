"""Shared platform package: settings, database access, NATS connections, wire messages."""

__version__ = "0.1.0"
