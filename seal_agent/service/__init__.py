"""The long-running daemon: the durable job queue (`queue`), the watched inbox
(`inbox`), the schedules that queue tasks (`schedules`), the served model and
the backend protocol the HTTP API needs (`serving`), the daemon that ties them
to the learner (`daemon`, a serving backend), and the OpenAI-compatible HTTP
API (`api/`, which gets a backend and never imports the daemon). Imports the
agent and everything below it."""
