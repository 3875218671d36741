"""Adapter store: HTTP server, storage (SQLite + content-addressed blobs), client with outbox, aggregation."""
