"""`python -m distill_cli <overrides>` is `distill <overrides>` (e.g. under torchrun, which starts
`python -m distill_cli ...`): the same Hydra app, configs from the installed package."""
from distill_cli.cli import distill_main

if __name__ == "__main__":
    distill_main()
