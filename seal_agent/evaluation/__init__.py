"""Measuring seal-agent: the single-passage ladder (`ladder`, `eval squad` and
`eval cpt`), the continual run (`continual`) and the speed benchmark (`bench`).
Imports the service, the agent and everything below."""
