"""Pre-initialised ("standby") engines: built without weights, bound to a warm replica at promotion.

A standby engine is a complete vLLM engine (model built, KV cache allocated, warm-up run) whose parameters
all alias one zero-filled scratch tensor (:func:`alias_to_scratch`, done by the ``warmserve`` loader when its
manifest says ``"standby": true``): it holds the KV cache and the runtime, not a copy of any model's weights.

Promotion calls :meth:`WarmServeWorkerExtension.warmserve_bind` through vLLM's ``collective_rpc`` (the
extension is installed with ``--worker-extension-cls``, the extension point RLHF frameworks use to update the
weights of a running engine): every parameter is put back in checkpoint format from the metadata vLLM
recorded when it built the model (``vllm.model_executor.model_loader.reload``), pointed at its arena view
(no copy; :func:`warmserve.worker.binding.bind_parameters`), and vLLM's own ``process_weights_after_loading``
runs again, exactly as after a cold load. Nothing of vLLM is patched.

Imported only inside vLLM processes.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any, cast

import torch
import torch.nn as nn
from vllm.config import ModelConfig
from vllm.distributed import get_tensor_model_parallel_rank, model_parallel_is_initialized
from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS, materialize_meta_tensor
from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
from vllm.model_executor.model_loader.utils import process_weights_after_loading

from warmserve.worker.binding import (
    BindReport,
    arena_kind,
    bind_parameters,
    copy_sliced,
    count_arena_views,
    iter_arena_tensors,
    open_arena_tensor,
    rank_manifest,
)

#: This process's standby model (set by the loader when it builds one), and whether it was bound since: a
#: standby engine is bound once, to a replica of its own model; an engine that serves is never rebound.
STANDBY: dict[str, Any] = {"model": None, "bound": False}


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 before vLLM has set up its process groups)."""
    return get_tensor_model_parallel_rank() if model_parallel_is_initialized() else 0


def fill_unmapped(model: nn.Module, manifest: dict[str, Any], arena: torch.Tensor, report: BindReport) -> int:
    """Copy from the arena the parameters the bind could not point at it (a dtype cast, another layout).

    Memory to memory, no file is read. A ``tp = 1`` replica goes through the model's own ``load_weights``; a
    tensor-parallel rank's tensors are already sliced, so they are copied as they are. Returns the bytes copied.
    """
    if not report.unmapped:
        return 0
    if manifest.get("tp", 1) > 1:
        return copy_sliced(model, manifest, arena, report.unmapped)
    load_weights = cast(Any, model).load_weights  # vLLM models define it; nn.Module's typing does not
    loaded = load_weights(iter_arena_tensors(manifest, arena, report.sources_for_unmapped))
    missing = [n for n in report.unmapped if loaded is not None and n not in loaded]
    if missing:
        raise RuntimeError(f"warmserve: arena has no weights for parameters {missing[:5]}")
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in report.unmapped)


def alias_to_scratch(model: nn.Module) -> int:
    """Point every parameter at the start of one zero-filled scratch tensor (sized for the largest one).

    The model can run (its outputs are meaningless), which is all vLLM's memory profiling and warm-up need;
    the weights' own memory is released. Returns the scratch size in bytes.
    """
    params = [p for p in model.parameters() if p.numel()]
    if not params:
        return 0
    size = max(p.numel() * p.element_size() for p in params)
    scratch = torch.zeros(size, dtype=torch.uint8, device=params[0].device)
    for p in params:
        p.data = scratch[: p.numel() * p.element_size()].view(p.dtype).view(p.shape)
    return size


def restore_checkpoint_parameters(model: nn.Module, device: torch.device) -> int:
    """Give every layer back its parameters in checkpoint format (as recorded when vLLM built the model).

    Post-processing may have replaced parameters (on CPU, linear weights become empty once packed for
    oneDNN); the metadata vLLM records for in-place reloading holds their original shape, dtype and weight
    loader. The new tensors are uninitialised (``torch.empty``: no memory is touched) and are pointed at the
    arena right after. Returns the number of parameters restored.
    """
    restored = 0
    with device:
        for layer in model.modules():
            info = LAYERWISE_INFO.get(layer)
            if info is None:
                continue
            params, _buffers = info.restore_metadata
            for name, meta in params.items():
                if name in SKIP_TENSORS:
                    continue
                # the tensor keeps the recorded class (a Parameter subclass) and attributes (weight_loader...)
                param = cast(nn.Parameter, materialize_meta_tensor(restore_layer_refs(meta, layer)))
                layer.register_parameter(name, param)
                restored += 1
    return restored


def bind_model(
    model: nn.Module, manifest: dict[str, Any], arena: torch.Tensor, model_config: ModelConfig, device: torch.device
) -> dict[str, Any]:
    """Bind a built model to the replica in the arena and post-process it as vLLM does after a load."""
    t0 = time.perf_counter()
    restored = restore_checkpoint_parameters(model, device)
    report = bind_parameters(model, manifest, arena)
    copied = fill_unmapped(model, manifest, arena, report)
    t1 = time.perf_counter()
    process_weights_after_loading(model, model_config, device)
    t2 = time.perf_counter()
    views, view_bytes = count_arena_views(model, arena)
    return {
        "model": manifest.get("model"),
        "restored_params": restored,
        "mapped_params": len(report.mapped),
        "mapped_bytes": report.mapped_bytes,
        "copied_params": len(report.unmapped),
        "copied_bytes_from_arena": copied,
        "bind_s": t1 - t0,
        "postprocess_s": t2 - t1,
        "arena_views_after_postprocess": views,
        "arena_view_bytes_after_postprocess": view_bytes,
    }


def release_kernels(model: nn.Module, device: torch.device) -> int:
    """Drop what post-processing built from the scratch weights (on CPU: oneDNN-packed copies of every linear
    weight, about a model's worth of memory) once the standby engine is initialised.

    Parameters go back to checkpoint shape, aliasing the scratch tensor again, and CPU linear layers compute
    with ``torch.nn.functional.linear`` over them, as vLLM does for layers it does not pack: the engine stays
    runnable (outputs meaningless, it serves nothing) while holding its KV cache and runtime only. The bind
    post-processes the real weights as usual. Returns the number of layers whose kernels were dropped.
    """
    restore_checkpoint_parameters(model, device)
    alias_to_scratch(model)
    dropped = 0
    for module in model.modules():
        if hasattr(module, "cpu_linear"):
            cast(Any, module).cpu_linear = torch.nn.functional.linear
            dropped += 1
    return dropped


def _device(worker: Any) -> torch.device:
    """The device of vLLM's worker (CPU workers set one too; CPU where an older worker does not)."""
    return torch.device(worker.device) if hasattr(worker, "device") else torch.device("cpu")


class WarmServeWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls`` (runs in every rank's worker process)."""

    def warmserve_release(self) -> dict[str, Any]:
        """After initialisation (warm-up done): release the kernels built from the standby's scratch weights."""
        worker = cast(Any, self)
        if STANDBY["model"] is None or STANDBY["bound"]:
            raise RuntimeError("this engine is not an unbound standby engine")
        device = _device(worker)
        with torch.no_grad():
            dropped = release_kernels(worker.model_runner.get_model(), device)
        gc.collect()
        return {"released_layers": dropped}

    def warmserve_bind(self, manifest_path: str) -> dict[str, Any]:
        worker = cast(Any, self)
        with open(manifest_path) as fh:
            manifest = rank_manifest(json.load(fh), tp_rank())
        if STANDBY["model"] is None or STANDBY["bound"]:
            raise RuntimeError("this engine is not an unbound standby engine")
        if manifest.get("model") != STANDBY["model"]:
            raise RuntimeError(f"standby engine of {STANDBY['model']!r} cannot serve {manifest.get('model')!r}")
        STANDBY["bound"] = True  # even if the bind fails half-way: the worker stops this engine then
        device = _device(worker)
        handle = manifest["arena"]
        index = device.index if arena_kind(handle).on_gpu and device.index is not None else 0
        arena = open_arena_tensor(handle, index)
        model = worker.model_runner.get_model()
        with torch.no_grad():
            report = bind_model(model, manifest, arena, worker.model_config, device)
        if hasattr(worker.model_runner, "reset_encoder_cache"):
            worker.model_runner.reset_encoder_cache()
        return report
