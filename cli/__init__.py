"""The typer application behind the `clim-fast` console script (thin: no logic of its own)."""
