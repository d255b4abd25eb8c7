"""Command line: build or preview a spine_radiographs dataset (`vertjax data`).

  python -m vertjax.data build --config=synthetic_small [--manual_dir=D] [--data_dir=D]
  python -m vertjax.data preview --config=synthetic_small --out=preview.png [--split=train] [--count=8]

The library is `vertjax.datasets` (open and build) and `vertjax.overlay`
(the preview drawing); the command is defined in `vertjax.cli`.
"""

from vertjax import cli

if __name__ == "__main__":
    cli.run_command("data")
