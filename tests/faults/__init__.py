"""Helpers for tests/test_faults.py: throwaway services, wrapped worker and server processes
with a side-effect counter, and the end-of-session summary."""
