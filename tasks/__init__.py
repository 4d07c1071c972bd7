"""Prefect tasks: thin wrappers over the library's stage functions (retries only where the work is I/O)."""
