"""seal-agent: SEAL (Self-Adapting Language Models) as a long-running continual-learning service."""

__version__ = "0.1.0"
