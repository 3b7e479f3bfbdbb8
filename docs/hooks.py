"""mkdocs hook: the notebook pages show the PNG kept beside each figure and beside the explorer.

mkdocs-jupyter converts the saved notebooks with nbconvert, which loads its configuration from
the Jupyter config path; pointing ``JUPYTER_CONFIG_DIR`` at ``docs/jupyter`` for the build puts
the static PNG before the live widget, which a static page cannot run without a kernel.
"""

import os
from pathlib import Path


def on_config(config):
    os.environ["JUPYTER_CONFIG_DIR"] = str(Path(__file__).parent / "jupyter")
    return config
