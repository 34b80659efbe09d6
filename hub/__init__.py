"""What the JupyterHub process loads: its API-only config and the spawners hublaunch ships."""
