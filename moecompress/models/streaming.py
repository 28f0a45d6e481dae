"""A model whose decoder layers stay on disk until they are worked on.

The skeleton is built on the meta device (non-persistent buffers such as rotary tables are real); `load_layer`
reads one decoder layer's tensors from the source safetensors shards (opened, memory-mapped, for that read
only), applies transformers' own checkpoint conversions (e.g. per-expert -> fused expert tensors) and casts them
to the compute dtype on the compute device; `release_layer` turns the layer back into meta tensors. Everything
outside the decoder layers but the output head is loaded once, for the embedding pass. Peak memory is one
layer plus the calibration activations, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelLoadError
from ..storage.outputs import disk_errors
from ..storage.tensorfiles import StoredTensor, write_safetensors
from .base import ModelAdapter
from .loading import (
    LoadedModel,
    dequantizing_config,
    empty_weights,
    read_config,
    require_finite_layer,
    require_finite_outside,
    require_float_weights,
    require_moe,
    require_untied_head,
    source_tensors,
)
from .registry import get_adapter

TRIM_STEP = 64 << 20
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "vocab*", "merges.txt", "*.py", "*.jinja"]


def local_folder(source: str) -> Path:
    """The folder holding `source`'s files: itself, or the Hub snapshot (config, weights, tokenizer) it names."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as exc:  # network, auth and not-found errors have no common base class
        raise ModelLoadError(
            f"could not download '{source}' from the Hub: {exc}. Check the id, network access "
            "and HF_TOKEN for gated models."
        ) from exc


class StreamedModel(LoadedModel):
    """`LoadedModel` whose `model` is a meta skeleton; decoder layers are read from disk one at a time."""

    def __init__(
        self, model: nn.Module, adapter: ModelAdapter, source: str, tensors: dict[str, StoredTensor], dtype: torch.dtype
    ):
        super().__init__(model, adapter, source)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
        from transformers.quantizers.auto import AutoHfQuantizer

        self.dtype, self.tensors = dtype, tensors
        self.work_dir: Path | None = None  # where layers changed in place (merged, pruned) are kept between passes
        self.changed: set[int] = set()
        self._trim_floor = resident_bytes()
        quantized = dequantizing_config(model.config, source)  # an MXFP4 / FP8 source: dequantized as it is read
        quantizer = AutoHfQuantizer.from_config(quantized, pre_quantized=True) if quantized is not None else None
        self.mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        renamings = [m for m in self.mapping if not isinstance(m, WeightConverter)]
        targets = model.state_dict()
        self.layers_prefix = adapter.layers_prefix(model)
        layer_re = re.compile(rf"^{re.escape(self.layers_prefix)}\.(\d+)\.")
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        self.head = head if head is not None and not tied else None  # loaded only to be written
        head_prefix = next((n + "." for n, m in model.named_modules() if m is self.head), None)
        self.layer_keys: dict[int, list[str]] = {}
        self.expert_keys: dict[int, list[str]] = {}  # of a layer with one MoE block: its routed experts' keys
        self.outside_keys: list[str] = []  # what the embedding pass needs
        self.head_keys: list[str] = []
        experts = _experts_paths(model, adapter)
        for key in tensors:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, targets)
            target = target if target in targets or key not in targets else key
            if target not in targets:
                continue  # e.g. DeepSeek-V3's multi-token-prediction layer: transformers does not load it either
            match = layer_re.match(target)
            if match:
                self.layer_keys.setdefault(int(match.group(1)), []).append(key)
                if target.startswith(experts.get(int(match.group(1)), "\0")):
                    self.expert_keys.setdefault(int(match.group(1)), []).append(key)
            else:
                (self.head_keys if head_prefix and target.startswith(head_prefix) else self.outside_keys).append(key)
        if self.head is not None and not self.head_keys:
            require_untied_head(model, [f"{head_prefix}{n}" for n, _ in self.head.named_parameters()], source)

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    def _load(self, keys: list[str], device: str | torch.device, experts: range | None = None) -> None:
        """Read `keys` into the skeleton through transformers' conversions; with `experts`, keys of routed experts
        and only those experts' part of them (per-expert keys renumbered from 0, fused ones sliced)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            with contextlib.ExitStack() as stack:
                handles = {}
                for key in keys:
                    file = self.tensors[key].file
                    if file not in handles:
                        handles[file] = stack.enter_context(safe_open(str(file), "pt"))
                state = {key: handles[self.tensors[key].file].get_slice(key) for key in keys}
                if experts is not None:
                    state = _chunk_state(state, experts)
                # in the stored dtype: converting (e.g. stacking experts) at bf16 halves the peak; cast after
                config = LoadStateDictConfig(
                    dtype=None, dtype_plan={"*": None}, device_map={"": str(device)}, weight_mapping=self.mapping
                )
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"could not read the weights of '{self.source}': {' '.join(str(exc).split())}; re-download the model."
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys or info.conversion_errors:
            bad = sorted(info.mismatched_keys or info.conversion_errors)[0]
            raise ModelLoadError(
                f"'{self.source}': tensor {bad} does not fit the model's config; the checkpoint "
                "and config.json disagree."
            )

    def prepare_layers(self, device: str | torch.device) -> None:
        """Load what the embedding pass needs: everything outside the decoder layers except the output head."""
        self._load(self.outside_keys, device)
        self.model.tie_weights()
        head = {id(t) for t in self.head.parameters()} if self.head is not None else set()
        for name, tensor in self._tensors(self.model, skip=self.layers):
            if tensor.device.type == "meta" and id(tensor) not in head:
                raise ModelLoadError(f"'{self.source}' has no weight for {name}; the checkpoint is incomplete.")
        _cast(self.model, self.dtype, skip=self.layers)

    def check_outside(self) -> None:
        """Read what lies outside the decoder layers (embeddings, norms, vision tower, LM head) once, to refuse NaN/Inf
        there before any work; freed again."""
        self._load(self.outside_keys + self.head_keys, "cpu")
        require_finite_outside(self.model, self.source)
        _to_meta(self.model, skip=self.layers)

    def after_capture(self) -> None:
        """The layer inputs are captured: embeddings and vision tower are not needed until the checkpoint is
        written (for Qwen3-30B-A3B the float32 embedding alone is 1.2 GB)."""
        _to_meta(self.model, skip=self.layers)
        _trim_heap()

    def load_layer(self, index: int, device: str | torch.device, experts: bool = True) -> nn.Module:
        """Decoder layer `index` in the compute dtype; without `experts`, its routed experts stay on the meta device
        (`load_experts` reads them a chunk at a time)."""
        layer = self.layers[index]
        if index in self.changed:  # a layer an earlier pass changed: its own float copy, not the source's
            layer.load_state_dict(load_file(self._work_file(index), device=str(device)), assign=True)
            return layer
        skipped = set() if experts else set(self.expert_keys.get(index, []))
        self._load([k for k in self.layer_keys.get(index, []) if k not in skipped], device)
        held = self._view(index).experts if skipped else None
        missing = [name for name, t in self._tensors(layer, skip=held) if t.device.type == "meta"]
        if missing:
            raise ModelLoadError(
                f"'{self.source}' has no weight for {self.layers_prefix}.{index}.{missing[0]}; the "
                "checkpoint is incomplete (a shard missing from the index?). Re-download the model."
            )
        _cast(layer, self.dtype)
        _trim_heap()
        require_finite_layer(self, index)
        return layer

    def can_chunk(self, index: int) -> str | None:
        """Why layer `index`'s routed experts cannot be read a chunk at a time (None: they can)."""
        if index in self.changed:
            return "an earlier pass changed it in place"
        if not self.expert_keys.get(index):
            return "its experts are not stored apart from the rest of the layer"
        return None

    def load_experts(self, index: int, experts: range, device: str | torch.device) -> None:
        """Routed experts `experts` (a range) of layer `index`, read from the source into its experts module, which
        then holds only them (`chunk` names them, `total_experts` counts the layer's) in the compute dtype;
        `release_experts` frees them."""
        view = self._view(index)
        module, total = view.experts, view.num_experts
        _resize_experts(module, total, len(experts))
        module.chunk, module.total_experts = experts, total
        self._load(self.expert_keys[index], device, experts)
        if any(t.is_meta for t in module.parameters()):
            raise ModelLoadError(f"'{self.source}': layer {index}'s experts {experts} could not all be read.")
        _cast(module, self.dtype)
        _trim_heap()

    def release_experts(self, index: int) -> None:
        """Free the chunk `load_experts` read; the module is the layer's whole (meta) experts module again."""
        module = self._view(index).experts
        _to_meta(module)
        _resize_experts(module, len(module.__dict__.pop("chunk")), module.__dict__.pop("total_experts"))
        _trim_heap()

    def _view(self, index: int):
        return self.adapter.moe_blocks_by_layer(self.model)[index][0]

    def release_layer(self, index: int, changed: bool = False) -> None:
        """Free the layer; with `changed` (a pass changed it in place and later passes need the change, e.g.
        merged experts) first keep it, in the compute dtype, in `work_dir`."""
        if changed and self.work_dir is not None:
            state = self.layers[index].state_dict()
            tmp = self._work_file(index).with_suffix(".tmp")
            with disk_errors(f"changed layer {index} to {self.work_dir}"):
                self.work_dir.mkdir(parents=True, exist_ok=True)
                write_safetensors(tmp, list(state.values()), list(state))
                os.replace(tmp, self._work_file(index))
            self.changed.add(index)
        _to_meta(self.layers[index])
        _trim_heap()

    def _work_file(self, index: int) -> Path:
        return self.work_dir / f"changed-{index:05d}.safetensors"

    def trim(self) -> None:
        """Hand freed heap back once the resident set has grown by `TRIM_STEP` since the lowest point seen after the
        last trim: each trim costs ~10 ms and the page faults of reusing the memory, so not after every expert."""
        resident = resident_bytes()
        self._trim_floor = min(self._trim_floor, resident)
        if resident > self._trim_floor + TRIM_STEP:
            _trim_heap()
            self._trim_floor = resident_bytes()

    def outside_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every persistent tensor outside the decoder layers (tied ones once), cast like a saved checkpoint."""
        self._load(self.outside_keys + self.head_keys, "cpu")
        self.model.tie_weights()
        seen, state = set(), {}
        prefix = self.layers_prefix + "."
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(prefix) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            state[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        _to_meta(self.model, skip=self.layers)
        return state

    @staticmethod
    def _tensors(module: nn.Module, skip: nn.Module | None = None):
        inside = {id(t) for t in skip.parameters()} | {id(t) for t in skip.buffers()} if skip is not None else set()
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if id(t) not in inside:
                yield name, t


def _experts_paths(model: nn.Module, adapter: ModelAdapter) -> dict[int, str]:
    """Per decoder layer with one MoE block, the path of its routed experts module and a dot."""
    names = {id(m): n for n, m in model.named_modules()}
    views = adapter.moe_blocks_by_layer(model)
    return {i: names[id(v[0].experts)] + "." for i, v in views.items() if len(v) == 1 and id(v[0].experts) in names}


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def _chunk_state(state: dict, experts: range) -> dict:
    """The part of a layer's expert tensors (source keys -> slices) that `experts` holds: a per-expert key (a second
    number after the layer's, `...layers.3.mlp.experts.17.w1.weight`) kept when its expert is in the range and
    renumbered from 0; a fused key (experts along its first dimension) sliced."""
    chunk = {}
    for key, tensor in state.items():
        numbers = list(_NUMBER.finditer(key))
        if len(numbers) < 2:
            chunk[key] = tensor[experts.start : experts.stop]
        elif int(numbers[1].group()) in experts:
            n = numbers[1]
            chunk[key[: n.start()] + str(int(n.group()) - experts.start) + key[n.end() :]] = tensor
    return chunk


def _cast(module: nn.Module, dtype: torch.dtype, skip: nn.Module | None = None) -> None:
    """Loaded floating parameters and persistent buffers to `dtype`, in place (non-persistent buffers, such as
    rotary tables computed at init, keep theirs, as in `from_pretrained`)."""
    inside = {id(t) for t in skip.parameters()} | {id(t) for t in skip.buffers()} if skip is not None else set()
    todo = []
    for sub in module.modules():
        todo += [sub._parameters[n] for n in sub._parameters] + [
            sub._buffers[n] for n in sub._buffers if n not in sub._non_persistent_buffers_set
        ]
    todo = [
        t
        for t in todo
        if t is not None and id(t) not in inside and t.is_floating_point() and t.dtype != dtype and not t.is_meta
    ]
    # smallest first: those are still views of the memory-mapped source (the stacked experts are copies), and
    # once they are cast the mapping goes, before the large casts double the experts' memory
    for t in sorted(todo, key=torch.Tensor.numel):
        t.data = t.data.to(dtype)


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after a layer's many mid-size frees)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _heap_for_streaming() -> None:
    """Serve allocations of 1 MiB and more by mmap, so that freeing them returns the memory at once. glibc's
    default raises that threshold to 32 MiB as large blocks are freed, and a layer's weight-sized blocks then
    fragment the heap: peak RSS of a streamed run grew by ~40% (MALLOC_MMAP_THRESHOLD_ in the environment wins)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _to_meta(module: nn.Module, skip: nn.Module | None = None) -> None:
    """Free a module's parameters and persistent buffers (non-persistent ones, computed at init, stay), but not
    those inside `skip`."""
    inside = {id(m) for m in skip.modules()} if skip is not None else set()
    for sub in module.modules():
        if id(sub) in inside:
            continue
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(b, device="meta")


def parameter_count(source: str) -> int:
    """Parameters in `source`'s safetensors headers (0 when it has none to read, e.g. a hub id not downloaded). A
    quantized source's scales are not parameters, and an MXFP4 source's `*_blocks` bytes hold two each."""
    try:
        tensors = source_tensors(local_folder(source))
    except ModelLoadError:
        return 0
    count = 0
    for t in tensors.values():
        if not t.name.endswith(("_scales", "_scale_inv")):
            count += math.prod(t.shape) * (2 if t.name.endswith("_blocks") and t.dtype == "U8" else 1)
    return count


def _resize_experts(module: nn.Module, old: int, new: int) -> None:
    """Make the experts module's stacked parameters (meta) and its `num_experts` count `new` experts, not `old`."""
    for name, tensor in list(module.named_parameters(recurse=False)):
        if tensor.dim() and tensor.shape[0] == old:
            shape = (new, *tensor.shape[1:])
            module._parameters[name] = nn.Parameter(
                torch.empty(shape, dtype=tensor.dtype, device="meta"), requires_grad=False
            )
    if hasattr(module, "num_experts"):
        module.num_experts = new


def open_streamed(
    source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, check_outside: bool = True
) -> StreamedModel:
    """The meta skeleton of `source` (folder or hub id) with its checkpoint indexed and checked; of the weights, only
    those outside the decoder layers are read, for `check_outside` (NaN/Inf), and freed again."""
    config = read_config(source, trust_remote_code)
    adapter = get_adapter(config.model_type)
    folder = local_folder(source)
    tensors = source_tensors(folder)
    if dequantizing_config(config, source) is None:
        require_float_weights(tensors, source)
    with empty_weights():
        model = adapter.auto_model_class().from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()
    require_moe(model, adapter, source)
    streamed = StreamedModel(model, adapter, source, tensors, dtype)
    if check_outside:
        streamed.check_outside()
    return streamed
