"""flywheel: a workflow-orchestrated self-improvement flywheel for language models (pure library, no Prefect)."""

__version__ = "0.1.0"
