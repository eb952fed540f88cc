"""clim-fast demo: embedded digits -> shards -> MoCo v2 and CLIM -> evaluation -> report."""
