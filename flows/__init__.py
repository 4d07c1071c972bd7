"""Prefect flows: they compose the tasks and read like the pipeline."""
