"""`seal-agent`: a thin click layer over SealAgent. Each subcommand is one verb.

Global options (--config, --state-dir, --set, -v) work before or after the
subcommand. `--json` prints one JSON object per line. User mistakes end in a
one-line error (exit 1 or 2), never a traceback.

This module is the group and its table of verbs; the verbs live by area
(`learning`, `restem`, `replay`, `daemon`, `evaluate`) on the shared `options`
and `output`. The CLI parses, calls the library, and renders; the library
never imports it.
"""

from __future__ import annotations

import click

from . import daemon, evaluate, learning, replay, restem
from .options import global_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@global_options
def main() -> None:
    """seal-agent: a continual-learning LLM daemon (SEAL).

    Learns documents into the model's weights by writing its own training data
    (self-edits), keeps every update in a reversible adapter log, and answers
    questions with the continually updated model.
    """


for _command in (
    learning.learn, learning.ask, learning.history, learning.consolidate, learning.rollback, learning.solve,
    restem.restem_cmd, restem.policy,
    replay.replay,
    daemon.run_daemon, daemon.status, daemon.schedule,
    evaluate.eval_group, evaluate.bench,
):
    main.add_command(_command)


if __name__ == "__main__":
    main()
