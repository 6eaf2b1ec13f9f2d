"""What every verb shares: the global options (--config, --state-dir, --set, -v,
accepted before or after the subcommand), the config and the agent they select,
and the one-line error for a user's mistake."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..config import Config, load_config
from ..errors import SealError


def _remember(name: str):
    def callback(ctx: click.Context, _param, value):
        if value not in (None, ()):
            store = ctx.find_root().meta.setdefault("seal_globals", {})
            if name == "overrides":
                store[name] = tuple(store.get(name, ())) + tuple(value)
            elif name == "verbose":
                store[name] = store.get(name, 0) + value
            else:
                store[name] = value
        return value
    return callback


def global_options(f: Callable) -> Callable:
    """--config/--state-dir/--set/-v, accepted on the group and on every subcommand."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     expose_value=False, callback=_remember("config_path"),
                     help="Config file (default: ./config.toml)."),
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), expose_value=False,
                     callback=_remember("state_dir"),
                     help="State directory (database, adapters, models); overrides paths.state_dir."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", expose_value=False,
                     callback=_remember("overrides"),
                     help="Override a config value by dotted path, e.g. --set train.epochs=5 (repeatable)."),
        click.option("-v", "--verbose", count=True, expose_value=False, callback=_remember("verbose"),
                     help="More log output (-v info, -vv debug)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def config_of(ctx: click.Context) -> Config:
    g = ctx.find_root().meta.get("seal_globals", {})
    level = {0: logging.WARNING, 1: logging.INFO}.get(g.get("verbose", 0), logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries(level)
    return load_config(g.get("config_path"), g.get("overrides", ()), g.get("state_dir"))


def _quiet_libraries(level: int) -> None:
    if level > logging.INFO:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def agent_of(ctx: click.Context):
    from ..agent import SealAgent

    root = ctx.find_root()
    verb = ctx.command_path[len(root.command_path):].strip()
    agent = SealAgent(config_of(ctx), role=f"`seal-agent {verb}`")
    ctx.call_on_close(agent.close)
    return agent


def handle_errors(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except SealError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return wrapper
