"""A compiled decode step for loaded checkpoints: transformers' static KV cache and `torch.compile` (inductor) of the
model's whole single-token forward, with the native kernels as custom ops (`torch.library`) so that the graph is
not broken at each expert or linear call. The compiled step runs transformers' eager attention (inductor fuses it),
small quantized linears (`dense:`) as float32 copies inside the graph and larger ones through the native packed GEMV,
the linears that share an input (q, k, v) as one call (`shared_input.py`), inductor's wrapper in C++; Python's
garbage collector is off while a generate runs, and the threads follow the free cores (`threads.py`).

    decoder = Decoder(moecompress.load("out/tiny-w4"))
    ids, stats = decoder.generate(prompt_ids, max_new_tokens=64)    # greedy; stats: prefill and compile seconds,
                                                                    # first-token latency, decode tokens/s

Inductor keeps what it compiled in `$TORCHINDUCTOR_CACHE_DIR` (set here, if unset, to
`$MOECOMPRESS_CACHE/inductor` or `~/.cache/moecompress/inductor`), so a later process compiles from that cache.
Where the compiled path does not apply (no native library, experts no native kernel reads, a GPU model, a model
class transformers does not compile, a compile failure) the eager step runs with the static cache; where that cache
does not hold the model (checked against the model's own cache on the first generate; sliding-window or chunked
layers) transformers' own generate runs. `Decoder.fallback` says why, once, in the log too."""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
import types
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import RecipeError
from . import native
from .native_linear import NATIVE_TOKENS, NativeLinear
from .packed_experts import PackedExperts
from .quantized_linear import QuantizedLinear
from .shared_input import SharedInputFusion
from .threads import DecodeThreads

log = logging.getLogger(__name__)

# PackedExperts and QuantizedLinears by a number given in order of creation: the same in every process that loads the
# same model, so that the compiled graph (whose op calls carry it as a constant) is the same and inductor's cache
# serves it.
_modules: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_count = itertools.count()


# The ops through torch.library's low-level API: a call costs about 14 us where `torch.library.custom_op`'s
# wrapper costs 26 (a 256 x 256 GEMV, 2 cores); no autograd (the decode step runs without gradients).
_library = torch.library.Library("moecompress", "DEF")
_library.define("packed_experts(int key, Tensor hidden, Tensor top_k_index, Tensor top_k_weights) -> Tensor")
_library.define("dense_linear(Tensor weight, Tensor? bias, Tensor x) -> Tensor")
_library.define("quantized_linear(int key, Tensor x) -> Tensor")
# what SharedInputFusion (runtime/shared_input.py) makes of the single calls that share x
_library.define("dense_linears(Tensor[] weights, Tensor?[] biases, Tensor x) -> Tensor[]")
_library.define("quantized_linears(int[] keys, Tensor x) -> Tensor[]")


def _packed_experts(key: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The native fused kernel of the `PackedExperts` registered under `key` (`compiled_path_refusal` checked that
    it applies): routing in, weighted sum of the chosen experts out."""
    return _modules[key].native_forward(hidden, top_k_index, top_k_weights)


def _dense_linear(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """x W^T (+ bias) through the native dense GEMV (float32 or bfloat16 weights as stored)."""
    if native.library() is None:
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return native.dense_linear(weight, bias, x)


def _quantized_linear(key: int, x: Tensor) -> Tensor:
    """The native packed GEMV of the `QuantizedLinear` registered under `key`."""
    return _modules[key].native_forward(x)


def _dense_linears(weights: list[Tensor], biases: list[Tensor | None], x: Tensor) -> list[Tensor]:
    return [y.to(x.dtype) for y in native.dense_linears(weights, biases, x)]


def _quantized_linears(keys: list[int], x: Tensor) -> list[Tensor]:
    """The `QuantizedLinear`s under `keys` in one native call (int8 activations where every one takes them)."""
    modules = [_modules[k] for k in keys]
    described = [m.descriptor() for m in modules]
    int8 = all(d[1] for d in described) and x.numel() <= native.INT8_TOKENS * x.shape[-1]
    return [y.to(x.dtype) for y in native.packed_linears(modules, x, int8, [d[0] for d in described])]


_library.impl("packed_experts", _packed_experts, "CompositeExplicitAutograd")
_library.impl("dense_linears", _dense_linears, "CompositeExplicitAutograd")
_library.impl("quantized_linears", _quantized_linears, "CompositeExplicitAutograd")
_library.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
_library.impl("quantized_linear", _quantized_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("moecompress::packed_experts")
def _(key: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # contiguous, as the kernel's


@torch.library.register_fake("moecompress::dense_linear")
def _(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("moecompress::quantized_linear")
def _(key: int, x: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], _modules[key].out_features)


@torch.library.register_fake("moecompress::dense_linears")
def _(weights: list[Tensor], biases: list[Tensor | None], x: Tensor) -> list[Tensor]:
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.register_fake("moecompress::quantized_linears")
def _(keys: list[int], x: Tensor) -> list[Tensor]:
    return [x.new_empty(*x.shape[:-1], _modules[k].out_features) for k in keys]


packed_experts_op = torch.ops.moecompress.packed_experts.default
dense_linear_op = torch.ops.moecompress.dense_linear.default


def register(module: nn.Module) -> int:
    """Every `PackedExperts` and `QuantizedLinear` is registered when made (a traced forward cannot write a weak
    dictionary)."""
    key = next(_count)
    _modules[key] = module
    return key


def quantized_linear_op(module: nn.Module, x: Tensor) -> Tensor:
    """What a traced `QuantizedLinear.forward` calls: one node in the graph."""
    return torch.ops.moecompress.quantized_linear.default(module.registry_key, x)


def experts_op(module: PackedExperts, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """What a traced `PackedExperts.forward` calls: one node in the graph."""
    return packed_experts_op(module.registry_key, hidden, top_k_index, top_k_weights)


# Weights from which a traced linear calls the native GEMV; smaller ones are inductor's (a 256 x 256 float32 GEMV:
# 7 us through torch's BLAS, 14 us through the op; moe-tiny-text's 8 MB LM head is faster native). A 256 x 1024
# bfloat16 k or v projection (512 KiB) is native, so that it joins its layer's q in one call (SharedInputFusion).
NATIVE_BYTES = 1 << 19


def linear_op(module: NativeLinear, x: Tensor) -> Tensor | None:
    """What a traced `NativeLinear.forward` calls where the native kernel takes `x` (else None: torch's linear)."""
    w = module.weight
    if x.numel() > NATIVE_TOKENS * module.in_features or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    return dense_linear_op(w, module.bias, x) if w.numel() * w.element_size() >= NATIVE_BYTES else None


# Single-token products with weights up to 2048 x 2048 as inductor's own fused reductions, not a BLAS call each
# (moe-tiny-text, 2 cores: a 256 x 256 GEMV costs 9 us through torch's BLAS, most of it the call); pointwise bodies
# of more than 8 ops stored once, not recomputed where they are read (the query's norm and rope, sines and cosines
# included, were recomputed for every cached position: attention 339 -> 103 us a layer on the synthetic model).
INDUCTOR_OPTIONS = {
    "cpp_wrapper": True,  # the graph's wrapper in C++, not Python (+15 % synthetic w4 + dense w4, +35 % moe-tiny-text)
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
    "post_grad_custom_post_pass": SharedInputFusion(),
    "realize_cpu_opcount_threshold": 8,
    "realize_opcount_threshold": 8,
}


def compiled_path_refusal(model: nn.Module) -> str | None:
    """Why the compiled decode step cannot run `model`, or None."""
    if native.library() is None:
        return f"the native kernels are unavailable ({native.kernel_name()})"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU (the compiled step runs the native CPU kernels)"
    if not getattr(model, "_can_compile_fullgraph", False) or not getattr(model, "_supports_static_cache", True):
        return f"transformers' {type(model).__name__} does not take a static KV cache under torch.compile"
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    if not experts:
        return "the model has no packed experts"
    probe = torch.zeros(1, experts[0].hidden_size)
    blocked = next((m for m in experts if not m.native_usable(probe)), None)
    if blocked is not None:
        return f"experts in {sorted({f.name for e in blocked.formats() for f in e.values()})} have no native kernel"
    return None


def inductor_cache() -> Path:
    """Where inductor keeps compiled graphs across runs (set once per process, unless the user set it: inductor
    writes its temporary-folder default into the variable on first use, which counts as unset)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        root = Path(os.environ.get("MOECOMPRESS_CACHE", Path.home() / ".cache" / "moecompress"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@dataclass
class DecodeStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # the prompt's forward, which makes the first token
    compile_s: float  # the first decode step, compiling (or loading the compiled graph); 0 eager
    decode_s: float  # the steps after it (every step, where there is no other)
    steps: int  # how many steps decode_s counts
    path: str

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.decode_s if self.decode_s else float("nan")

    def to_dict(self) -> dict:
        return {**self.__dict__, "first_token_s": self.prefill_s, "decode_tokens_per_s": self.tokens_per_s}


class Decoder:
    """Greedy generation with a static KV cache and, where `compiled_path_refusal` allows, the compiled step."""

    def __init__(self, model: nn.Module, max_len: int | None = None, compile: bool = True, threads: int | None = None):
        """`threads`: at most this many (default torch's count), fewer while other processes keep cores busy
        (`DecodeThreads`)."""
        self.model, self.threads, self.governor = model.eval(), threads, None
        self.max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.fallback = compiled_path_refusal(model) if compile else "compile=False"
        if self.fallback is not None and compile:
            log.warning("moecompress: decoding without the compiled step: %s.", self.fallback)
        self.compiled, self.static = self.fallback is None, True
        self.checked: bool | None = None  # the static cache checked against the model's own (first generate)
        self.step = self._step
        if self.compiled:
            inductor_cache()
            for module in model.modules():
                if isinstance(module, QuantizedLinear):
                    module.prepare_compiled(NATIVE_BYTES)
            self.step = torch.compile(own_code(self._step), dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)

    def _step(self, token: Tensor, cache, position: Tensor) -> Tensor:
        return self.model(token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]

    def _next(self, token: Tensor, cache, position: Tensor, warm: bool) -> Tensor:
        """One step; `warm`: this generate's first step ran, so its shapes are compiled and dynamo need only check
        the guards that tell its graphs apart (a third of a millisecond per step on moe-tiny-text)."""
        if warm and self.compiled:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.step(token, cache, position)
        try:
            return self.step(token, cache, position)
        except Exception as exc:  # noqa: BLE001 - whatever dynamo or inductor raise: the eager step still works
            if not self.compiled:
                raise
            self._eager(f"torch.compile failed: {one_line(exc)}")
            return self.step(token, cache, position)

    def generate(self, prompt: Tensor, max_new_tokens: int, eos: int | None = None) -> tuple[list[int], DecodeStats]:
        length = prompt.numel()
        tokens, times, _ = self._decode(prompt.reshape(1, -1), max_new_tokens, eos)
        steps = times[1:]
        compile_s = steps[0] if self.compiled and steps else 0.0
        timed = steps[1:] if self.compiled and len(steps) > 1 else steps
        path = "compiled (inductor, native kernels as custom ops)" if self.compiled else f"eager ({self.fallback})"
        path = path if self.static else f"transformers' generate ({self.fallback})"
        return tokens, DecodeStats(length, len(tokens), times[0], compile_s, sum(timed), len(timed), path)

    def score(self, prompt: Tensor, tokens: list[int]) -> Tensor:
        """The logits [len(tokens), vocab] this path computes for `tokens` after `prompt` (fed whatever it would
        have chosen): step i's logits predict tokens[i]."""
        return torch.stack(self._decode(prompt.reshape(1, -1), len(tokens), None, tokens)[2])

    def _decode(self, prompt: Tensor, new: int, eos: int | None, forced: list[int] | None = None):
        """(argmax tokens, seconds of the prefill and of each step, each position's logits)."""
        length = prompt.shape[1]
        if length + new > self.max_len:
            raise RecipeError(
                f"a prompt of {length} tokens and {new} new ones exceed the {self.max_len} positions of this model; "
                "shorten the prompt or ask for fewer new tokens."
            )
        if self.static and self.checked is None:
            with torch.no_grad():
                self.checked = self._static_cache_agrees(prompt)
        limit = self.threads or torch.get_num_threads()
        if self.governor is None or self.governor.limit != limit:
            self.governor = DecodeThreads(limit)
        start = time.perf_counter()  # the first token's latency includes choosing the threads
        with self.governor:
            if not self.static:
                return self._transformers(prompt, new, eos, forced)
            return self._static_decode(prompt, new, eos, forced, start)

    def _static_decode(self, prompt: Tensor, new: int, eos: int | None, forced: list[int] | None, start: float):
        length, threads = prompt.shape[1], self.governor
        times, tokens, logits = [], [], []
        with torch.no_grad(), no_gc():
            cache, last = self._prefill(prompt, length + new)
            for i in range(new):
                logits.append(last[0].float())
                tokens.append(int(last.argmax(-1)))
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                if tokens[-1] == eos or i == new - 1:
                    break
                fed = torch.tensor([[tokens[-1] if forced is None else forced[i]]])
                last = self._next(fed, cache, torch.tensor([length + i]), i > 0)
                if i > 0:  # the first step may compile
                    threads.step(time.perf_counter() - start)
        return tokens, times, logits

    def _transformers(self, prompt: Tensor, new: int, eos: int | None, forced: list[int] | None):
        """Today's path where the static cache does not apply: transformers' generate (the whole call timed as the
        steps), or with `forced` tokens one forward over the prompt and them."""
        with torch.no_grad():
            if forced is not None:
                logits = self.model(torch.cat([prompt, torch.tensor([forced[:-1]])], 1)).logits[
                    0, prompt.shape[1] - 1 :
                ]
                return logits.argmax(-1).tolist(), [], list(logits.float())
            start = time.perf_counter()
            stop = {"eos_token_id": eos, "pad_token_id": eos} if eos is not None else {"min_new_tokens": new}
            out = self.model.generate(prompt, max_new_tokens=new, do_sample=False, **stop)
            seconds = time.perf_counter() - start
        tokens = out[0, prompt.shape[1] :].tolist()
        return tokens, [0.0, *[seconds / max(len(tokens) - 1, 1)] * (len(tokens) - 1)], []

    def _prefill(self, prompt: Tensor, total: int):
        """(transformers' static KV cache, the prompt's last logits)."""
        from transformers import StaticCache

        length = prompt.shape[1]
        # the cache's length is a shape of the compiled graph: powers of two from 256 keep the graphs few
        size = min(max(256, 1 << (total - 1).bit_length()), self.max_len)
        cache = StaticCache(config=self.model.config, max_cache_len=size)
        out = self.model(prompt, past_key_values=cache, cache_position=torch.arange(length), use_cache=True)
        return cache, out.logits[:, -1]

    def _static_cache_agrees(self, prompt: Tensor) -> bool:
        """Whether transformers' static cache (with the eager attention the compiled step fuses, else the model's own)
        gives this model's own cache's logits for a step after a few prompt tokens (eagerly); where it does not, or
        cannot hold the model's states, the model's own cache and attention run (eager)."""
        head, token = prompt[:, :4], prompt[:, 4:5] if prompt.shape[1] > 4 else prompt[:, :1]
        own = self.model(head, use_cache=True)
        theirs = self.model(token, past_key_values=own.past_key_values, use_cache=True).logits[0, -1].float()
        original = getattr(self.model.config, "_attn_implementation", None)
        problem = self._static_problem(head, token, theirs, eager_attention(self.model) if self.compiled else False)
        if problem is not None and set_attention(self.model, original):
            problem = self._static_problem(head, token, theirs, False)
        return True if problem is None else self._no_static(problem)

    def _static_problem(self, head: Tensor, token: Tensor, theirs: Tensor, eager: bool) -> str | None:
        """Why the static cache's logits for `token` after `head` are not `theirs` (None: they are)."""
        from transformers import StaticCache

        what = " with eager attention" if eager else ""
        try:
            cache = StaticCache(config=self.model.config, max_cache_len=16)
            if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):  # positions a graph would fix
                return "its cache has sliding-window or chunked layers"
            self.model(head, past_key_values=cache, cache_position=torch.arange(head.shape[1]), use_cache=True)
            ours = self._step(token, cache, torch.tensor([head.shape[1]]))[0].float()
        except (RuntimeError, ValueError, TypeError) as exc:
            return f"transformers' static KV cache{what} does not fit this model ({one_line(exc)})"
        error = float((ours - theirs).norm() / theirs.norm())
        if error > (1e-2 if torch.finfo(self.model.dtype).bits >= 32 else 1e-1):  # 16-bit activations: 1e-2 is noise
            return f"transformers' static KV cache{what} changes this model's logits ({error:.2g} relative)"
        return None

    def _no_static(self, why: str) -> bool:
        self._eager(why)
        self.static = False
        return False

    def _eager(self, why: str) -> None:
        self.fallback, self.compiled, self.step = why, False, self._step
        log.warning("moecompress: decoding without the compiled step: %s.", why)


def eager_attention(model: nn.Module) -> bool:
    """transformers' eager attention (matmuls and softmax) for the compiled step, where the model has another:
    inductor fuses it with the cache update into one kernel per layer, faster for one query than the SDPA kernel it
    would call (synthetic 8-layer model, 2 cores: 154 against 141 tokens/s). The model keeps it. Whether it changed."""
    return getattr(model.config, "_attn_implementation", "eager") != "eager" and set_attention(model, "eager")


def set_attention(model: nn.Module, name: str | None) -> bool:
    """Whether `model` now runs transformers' attention `name` (and did not before)."""
    if name is None or getattr(model.config, "_attn_implementation", None) == name:
        return False
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, NotImplementedError, ImportError):
        return False
    return True


@contextlib.contextmanager
def no_gc():
    """Python's cyclic garbage collector off for the duration: its passes over a loaded model's objects cost
    milliseconds, now and then, in the middle of a step (a decode loop makes no garbage cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def own_code(method):
    """The bound `method` with a code object of its own. Dynamo keeps compiled graphs per code object, at most
    `recompile_limit` (8) of them: the Decoders of one process (a benchmark, an evaluation of several checkpoints)
    would share them and, past the eighth, fall back to eager."""
    f = method.__func__
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(copy, method.__self__)


def one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" if str(exc).strip() else type(exc).__name__
