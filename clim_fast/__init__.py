"""clim-fast: CLIM contrastive pretraining (MoCo v2 + center-wise local image mixture)."""

__version__ = "0.1.0"
