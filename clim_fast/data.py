"""The loader settings a run's loaders share, read from the config once."""

from __future__ import annotations

from clim_fast.method.moco import image_dtype


def loader_options(cfg, device) -> dict:
    """Keyword arguments for `PretrainLoader` and `FeatureLoader`: the device, CPU workers, DALI
    threads, where JPEGs are decoded, and the dtype the encoders read (fp16 in fp16 runs)."""
    return dict(device=device, workers=cfg.workers, threads=cfg.dali_threads, hw_decoder_load=cfg.hw_decoder_load,
                cpu_decode=cfg.cpu_decode, cpu_views=cfg.cpu_views, dtype=image_dtype(cfg.precision, device))
