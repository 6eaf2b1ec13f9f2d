"""The long-running daemon: the durable job queue (`queue`), the watched inbox
(`inbox`), the daemon that ties them to the learner and the schedules
(`daemon`), and the OpenAI-compatible HTTP API (`api/`). Imports the agent and
everything below it."""
