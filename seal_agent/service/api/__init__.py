"""The HTTP API: what a request must pass first (`guard`) and the
OpenAI-compatible routes (`app`)."""
