"""The Hydra config tree as a package: Hydra's `pkg://distill_cli.conf` search path only accepts
a directory holding an `__init__.py`, and it keeps working from any install and any working
directory (no `.py` modules live here: only config.yaml, search.yaml and the option groups)."""
