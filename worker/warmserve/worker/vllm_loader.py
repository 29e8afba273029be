"""The ``warmserve`` load format: a vLLM model loader that maps prewarmed weights.

Used as ``vllm serve <model dir> --load-format warmserve
--model-loader-extra-config '{"manifest": "/path/manifest.json", "report": "/path/report.json"}'``.

The manifest (written by the agent) names the arena (a ``/dev/shm`` file on
CPU, a CUDA IPC handle on GPU) and the byte range of every tensor of this
replica. The loader builds the model exactly like vLLM's default loader (so
buffers such as rotary caches are computed as usual and parameters are lazily
allocated, never touched), then points each parameter at its arena view
(:mod:`warmserve.worker.binding`). The weight files are never opened.

After binding, vLLM's ``process_weights_after_loading`` runs unchanged. On CPU
it repacks linear weights for oneDNN (``dispatch_cpu_unquantized_gemm``), i.e.
vLLM itself copies those weights once; the loader measures that copy (time,
anonymous-memory growth, parameters that stopped being arena views) and writes
it to ``report`` so it is documented by measurement, not by guess. On GPU,
unquantized weights are not repacked and stay arena views.

Imported only inside vLLM processes (through :func:`warmserve.worker.vllm_plugin.register`).
"""

from __future__ import annotations

import json
import os
import time
from copy import copy
from typing import Any, cast

import torch
import torch.nn as nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

from warmserve.worker.binding import (
    arena_kind,
    bind_parameters,
    count_arena_views,
    open_arena_tensor,
    rank_manifest,
)
from warmserve.worker.vllm_extension import STANDBY, alias_to_scratch, fill_unmapped, tp_rank

logger = init_logger(__name__)

LOAD_FORMAT = "warmserve"


def _rss_anon() -> int:
    """Anonymous resident bytes of this process (grows when vLLM copies weights)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WarmServeModelLoader(BaseModelLoader):
    """Map a warm replica's tensors from the WarmServe arena instead of reading files."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        extra = copy(load_config.model_loader_extra_config or {})
        manifest_path: str | None = extra.pop("manifest", None) or os.environ.get("WARMSERVE_MANIFEST")
        self.report_path: str | None = extra.pop("report", None)
        if extra:
            raise ValueError(f"unexpected extra config keys for load format {LOAD_FORMAT}: {sorted(extra)}")
        if not manifest_path:
            raise ValueError(f"load format {LOAD_FORMAT} needs model_loader_extra_config.manifest")
        self.manifest_path: str = manifest_path

    def _manifest(self) -> dict[str, Any]:
        """This process's part of the manifest: its tensor-parallel rank's shard."""
        with open(self.manifest_path) as fh:
            return rank_manifest(json.load(fh), tp_rank())

    def get_external_weight_memory(self, vllm_config: VllmConfig) -> int:
        manifest = self._manifest()
        if manifest.get("standby") or not arena_kind(manifest["arena"]).on_gpu:
            return 0
        return sum(int(t["nbytes"]) for t in manifest["tensors"].values())

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: the weights are already in memory."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        manifest = self._manifest()
        arena = open_arena_tensor(
            manifest["arena"], torch.accelerator.current_device_index() if arena_kind(manifest["arena"]).on_gpu else 0
        )
        self._bind(model, manifest, arena)

    def _bind(self, model: nn.Module, manifest: dict[str, Any], arena: torch.Tensor) -> dict[str, Any]:
        t0 = time.perf_counter()
        report = bind_parameters(model, manifest, arena)
        copied_bytes = fill_unmapped(model, manifest, arena, report)
        return {
            "bind_s": time.perf_counter() - t0,
            "mapped_params": len(report.mapped),
            "mapped_bytes": report.mapped_bytes,
            "copied_params": len(report.unmapped),
            "copied_bytes_from_arena": copied_bytes,
        }

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        manifest = self._manifest()
        device_config = vllm_config.device_config
        # vLLM has resolved the device and the dtype by the time a loader runs (its own loaders rely on it)
        target_device = torch.device(
            cast(
                "torch.device | str",
                device_config.device if self.load_config.device is None else self.load_config.device,
            )
        )
        if manifest.get("standby"):
            return self._load_standby(vllm_config, model_config, target_device, prefix)
        device_index = target_device.index if target_device.index is not None else 0
        arena = open_arena_tensor(manifest["arena"], device_index)
        with set_default_torch_dtype(cast(torch.dtype, model_config.dtype)):
            with target_device:
                t0 = time.perf_counter()
                model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                init_s = time.perf_counter() - t0
            stats = self._bind(model, manifest, arena)
            views_before, view_bytes_before = count_arena_views(model, arena)
            rss_before = _rss_anon()
            t1 = time.perf_counter()
            process_weights_after_loading(model, model_config, target_device)
            post_s = time.perf_counter() - t1
            rss_after = _rss_anon()
            views_after, view_bytes_after = count_arena_views(model, arena)
        report = {
            "model": manifest.get("model"),
            "owner": manifest.get("owner"),
            "init_s": init_s,
            **stats,
            "arena_views_before_postprocess": views_before,
            "arena_view_bytes_before_postprocess": view_bytes_before,
            "arena_views_after_postprocess": views_after,
            "arena_view_bytes_after_postprocess": view_bytes_after,
            "postprocess_s": post_s,
            "postprocess_rss_anon_growth_bytes": rss_after - rss_before,
            "device": str(target_device),
        }
        logger.info(
            "warmserve: mapped %d params (%.1f MiB) from the arena; post-processing took %.3fs, "
            "RssAnon +%.1f MiB, %d params still arena views",
            stats["mapped_params"],
            stats["mapped_bytes"] / 2**20,
            post_s,
            (rss_after - rss_before) / 2**20,
            views_after,
        )
        if self.report_path and tp_rank() == 0:  # rank 0 reports for the engine
            with open(self.report_path, "w") as fh:
                json.dump(report, fh, indent=1)
        return model.eval()

    def _load_standby(
        self, vllm_config: VllmConfig, model_config: ModelConfig, target_device: torch.device, prefix: str
    ) -> nn.Module:
        """A pre-initialised engine's model: built, every parameter aliasing one zero scratch tensor.

        Bound to a warm replica later by :meth:`WarmServeWorkerExtension.warmserve_bind`.
        """
        with set_default_torch_dtype(cast(torch.dtype, model_config.dtype)):
            with target_device:
                model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            scratch = alias_to_scratch(model)
            STANDBY["model"] = self._manifest().get("model")
            process_weights_after_loading(model, model_config, target_device)
        logger.info("warmserve: standby engine built; parameters alias %.1f MiB of scratch", scratch / 2**20)
        if self.report_path:
            with open(self.report_path, "w") as fh:
                json.dump({"standby": True, "scratch_bytes": scratch, "device": str(target_device)}, fh)
        return model.eval()
