"""Where the Hydra configs live: inside the package, so an installed wheel carries them."""
from __future__ import annotations

from pathlib import Path

#: the primary config tree (`config.yaml`, the option groups, `recipe/`)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
#: the same tree through Hydra's package search path (any install, any working directory)
CONF_PACKAGE = "pkg://distill_cli.conf"
