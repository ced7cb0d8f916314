"""prkit: personalized residuals and localized attention-guided (LAG) sampling for Stable Diffusion.

Importing prkit does no I/O, downloads nothing and sets no global torch state; submodules load on
first use so that ``import prkit`` stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "add_residuals": "residuals", "remove_residuals": "residuals", "get_residuals": "residuals",
    "residual_names": "residuals", "residuals_disabled": "residuals", "only_residuals": "residuals",
    "Residuals": "residuals", "ResidualConfig": "residuals",
    "capture_attention": "attention", "AttentionStore": "attention_store",
    "lag_sampling": "lag", "LAGConfig": "lag", "prompt_tokens": "lag",
    "save_residuals": "files", "load_residuals": "files", "export_lora": "files", "read_metadata": "files",
    "load_pipeline": "pipeline", "native_resolution": "pipeline", "generate": "sample", "SampleConfig": "sample",
    "load_concept": "data", "Concept": "data", "load_dreambooth": "dreambooth",
    "train_residuals": "train", "TrainConfig": "train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'prkit' has no attribute {name!r}")
