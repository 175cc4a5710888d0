"""Replication: every partition a Raft group (see docs/replication.md)."""
