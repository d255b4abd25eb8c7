"""`python -m vertjax <command>`: see `vertjax.cli`."""

from vertjax import cli

cli.run()
