"""`python -m vertjax.review PRED_DIR`: see `vertjax.cli` (`vertjax review`)."""

from vertjax import cli

cli.run_command("review")
