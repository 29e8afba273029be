"""vLLM general plugin: registers the ``warmserve`` load format.

vLLM calls every ``vllm.general_plugins`` entry point in every process it
starts (API server, engine core, workers), so :func:`register` must be cheap
and must never break vLLM: it only registers a class with
``register_model_loader`` (vLLM's model-loader modules are imported by those
processes anyway) and logs instead of raising if anything goes wrong.
Engines that do not pass ``--load-format warmserve`` never touch our code.
"""

from __future__ import annotations

import logging

_registered = False


def register() -> None:
    """Entry point ``warmserve.worker.vllm_plugin:register``."""
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

        from warmserve.worker.vllm_loader import LOAD_FORMAT, WarmServeModelLoader

        if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not WarmServeModelLoader:
            register_model_loader(LOAD_FORMAT)(WarmServeModelLoader)
        _registered = True
    except Exception:  # a plugin must not take vLLM down
        logging.getLogger(__name__).exception("warmserve: could not register the model loader")
