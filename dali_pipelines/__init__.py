"""DALI graphs feeding clim-fast: pretraining (anchor + positive views), features, linear eval.

Exports are resolved lazily: DALI's spawned worker processes import `dali_pipelines.external`,
and must not pay for importing torch and the graph modules.
"""

_EXPORTS = {
    "epoch_share": "dali_pipelines.epochs",
    "eval_share": "dali_pipelines.epochs",
    "PretrainLoader": "dali_pipelines.pretrain",
    "FeatureLoader": "dali_pipelines.center",
    "LinearTrainLoader": "dali_pipelines.linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dali_pipelines' has no attribute {name!r}")
