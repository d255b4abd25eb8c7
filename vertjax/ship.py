"""Command line: ship a training run's model as one verified folder (`vertjax ship`).

  python -m vertjax.ship --workdir=runs/aasce_fov_seed0 [--checkpoint=latest] \
      --out=vertjax/shipped_models/aasce_fov --description="..." \
      [--results=runs/aasce_fov_seed0/results.json ...]

Takes the checkpoint's parameters (the moving average where the run kept
one), its config, the training split's pixel statistics and post-processing
prior, and writes them with `vertjax.shipped.write`, then reads the folder
back. Each `--results` file (a `results.json` of that checkpoint) adds its
metrics under its split. The command is defined in `vertjax.cli`.
"""

from vertjax import cli

if __name__ == "__main__":
    cli.run_command("ship")
