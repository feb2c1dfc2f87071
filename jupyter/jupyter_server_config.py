"""JupyterLab settings of the project, read when `workbench lab` (or `make lab`) starts the server.

`workbench lab` puts this folder on JUPYTER_CONFIG_PATH, so the user's own Jupyter configuration still
applies. The token comes from the JUPYTER_TOKEN environment variable (never from the command line, where
the process list would show it); `labconfig/default_setting_overrides.json` makes the paired `.py`
notebooks open as notebooks on a double click.
"""

from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821

c.ServerApp.ip = "127.0.0.1"
c.ServerApp.open_browser = False
c.ServerApp.root_dir = str(Path(__file__).resolve().parents[1])
c.ServerApp.port_retries = 0  # a busy port is an error: the printed address must be the one served
