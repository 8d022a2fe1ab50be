"""`vlm4rec`: the command line of the product. Every command reads the settings once and hands
plain values to the parts. One module per command group: `stack` (config, topics, worker,
streams, up), `evaluation` (replay, eval), `harness` (bench, demo, chaos, soak); each is thin
and calls into the package that does the work."""

from __future__ import annotations

import logging

import click

from vlm4rec.extras import MissingExtra, require
from vlm4rec.settings import Settings

log = logging.getLogger("vlm4rec")


def needs(module: str, extra: str, purpose: str) -> None:
    """Stop a command at its start, with the install line, when an optional dependency it
    needs is missing (not after minutes of work)."""
    try:
        require(module, extra, purpose)
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """VLM4Rec: a streaming recommender for fresh, visual content.

    Items (image + text) arriving on Kafka are described by a vision-language model and
    embedded; user profiles follow every interaction; Milvus serves nearest items, pushed
    to the `recs` topic. Settings come from VLM4REC_* environment variables
    (see `vlm4rec config`).
    """
    settings = Settings()
    _setup_logging(settings.log_level)
    ctx.obj = settings


# the command groups register themselves on `main` (imported last: they import `main`)
from vlm4rec.cli import evaluation, harness, stack  # noqa: E402,F401
