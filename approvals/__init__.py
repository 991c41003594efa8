"""Approvals: policies that say when a person must decide, the requests they open, and the
decisions people make."""
