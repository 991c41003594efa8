"""Audit: the hash-chained ledger of everything that happens, and its verification and
export."""
