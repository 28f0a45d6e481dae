"""`moecompress analyze|compress|eval ...` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

from .errors import MoECompressError, NonFiniteError, RecipeError


def _load_for_eval(
    path: str,
    trust_remote_code: bool,
    cache_dequantized: bool | None = None,
    dtype: str = "float32",
    dense_kernels: str = "auto",
):
    """A packed checkpoint (moecompress.json present) or any supported original model, in `dtype` (a packed
    checkpoint's experts stay packed), its processor and load seconds. `cache_dequantized` None: packed experts
    run through the native CPU kernels where they are available (no dense copies: a 30B MoE's float32 experts
    would take 120 GB), else through kept dense copies. `dense_kernels`: native or torch for the unquantized
    linear layers; auto: native for a checkpoint, torch (transformers as it is) for an original model."""
    import torch

    from .api import load
    from .calibration.batches import load_tokenizer_or_processor
    from .models import get_adapter, load_model, read_config
    from .runtime import native
    from .runtime.native_linear import use_native_linears

    if cache_dequantized is None:
        cache_dequantized = native.library() is None

    config = read_config(path, trust_remote_code)
    multimodal = get_adapter(config.model_type).is_multimodal
    start = time.perf_counter()
    checkpoint = _is_checkpoint(path)
    if checkpoint:
        model = load(
            path,
            getattr(torch, dtype),
            cache_dequantized=cache_dequantized,
            trust_remote_code=trust_remote_code,
            dense_kernels=False,
        )
    else:
        model = load_model(path, getattr(torch, dtype), trust_remote_code=trust_remote_code).model
    if dense_kernels == "native" or (dense_kernels == "auto" and checkpoint):
        use_native_linears(model)
    seconds = time.perf_counter() - start
    return model, load_tokenizer_or_processor(path, multimodal, trust_remote_code, model.config), seconds


def data_label(path: str) -> str:
    """How results name an evaluation file: its stem, with the folder when the stem alone says nothing (test.txt)."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.stem in ("test", "eval", "validation", "valid", "train", "data") else p.stem


def _is_checkpoint(path: str) -> bool:
    from .io.checkpoint import MANIFEST

    return (Path(path).expanduser() / MANIFEST).is_file()


def _record(args, kind: str, results: dict) -> dict:
    """Add `results` to the run record (--record, or the checkpoint's own run.json); return where it went."""
    from .evaluation.records import RUN_RECORD, RunRecord, add_evaluation, read_record
    from .io.checkpoint import read_manifest

    location = args.record or (args.model if _is_checkpoint(args.model) else None)
    if args.no_record or location is None:
        return results
    if (Path(args.model).expanduser() / RUN_RECORD).is_file():
        new = read_record(args.model)
        new.evaluations = {}
    elif _is_checkpoint(args.model):  # written before run records existed: what its manifest says
        summary = read_manifest(args.model).get("summary", {})
        new = RunRecord(
            name=Path(args.model.rstrip("/")).name,
            model=args.model,
            base_model=summary.get("model"),
            recipe=summary.get("recipe"),
            method=summary.get("recipe", "unknown"),
            expert_bits_per_param=summary.get("bits_per_expert_param"),
            compression=summary,
        )
    else:
        from .evaluation.efficiency import stored_itemsize

        new = RunRecord(
            name=Path(args.model.rstrip("/")).name,
            model=args.model,
            method="uncompressed",
            expert_bits_per_param=8.0 * stored_itemsize(args.model),
        )
    new.name = args.name or new.name
    return {**results, "record": str(add_evaluation(location, kind, results, new))}


def _check_record_target(args) -> None:
    """Before any model is loaded: a --record file must be a run record (or new) in a writable folder."""
    from .evaluation.records import read_record, record_path
    from .storage.outputs import check_file_output

    if args.record and not args.no_record:
        check_file_output(record_path(args.record), "--record")
        if record_path(args.record).exists():
            read_record(args.record)


def cmd_compress(args) -> dict:
    from .distributed import join
    from .pipeline import compress

    recipe = _recipe_with_overrides(args)
    ranks = join(recipe.device, args.backend)
    if ranks.size != args.ranks and args.ranks > 1:
        raise RecipeError(f"--ranks {args.ranks} in a job of {ranks.size} ranks; leave --ranks out under torchrun.")
    result = compress(
        args.model,
        recipe,
        args.output,
        trust_remote_code=args.trust_remote_code,
        plan=args.plan,
        overwrite=args.overwrite,
        stream=not args.no_stream,
        max_shard_bytes=args.max_shard_size,
        ranks=ranks,
    )
    report = result.report.to_dict()
    report["rare_experts"] = len(report["rare_experts"])
    if ranks.multi:  # each rank's peak resident set, in rank order
        report["rank_peak_rss_mb"] = ranks.gathered(_peak_rss_mb())
    return report


def _recipe_with_overrides(args):
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe) if getattr(args, "recipe", None) else Recipe()
    for key, value in (("dataset", args.calib), ("vl_dataset", args.vl_calib), ("num_samples", args.num_samples)):
        if value:
            setattr(recipe.calibration, key, value)
    if getattr(args, "avg_bits", None):
        (recipe.factor if recipe.factor.enabled else recipe.allocation).avg_bits = args.avg_bits
    if getattr(args, "recovery_steps", None) is not None:
        recipe.recovery.enabled = args.recovery_steps > 0
        recipe.recovery.steps = max(args.recovery_steps, 1)
    if getattr(args, "device", None):
        recipe.device = args.device
    if getattr(args, "max_memory", None):
        recipe.calibration.max_memory = args.max_memory
    if getattr(args, "experts_per_chunk", None):
        recipe.calibration.experts_per_chunk = args.experts_per_chunk
    return recipe.validate()


def cmd_upcycle(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .errors import ModelLoadError, RecipeError
    from .models import read_config
    from .storage.outputs import atomic_folder, claim_output
    from .training.upcycle import upcycle_dense_to_mote

    if not 1 <= args.top_k <= args.experts:
        raise RecipeError(
            f"--top-k {args.top_k} with --experts {args.experts}: the router picks 1 to --experts experts."
        )
    if not 0 < args.routed_share <= 1 or args.noise < 0:
        raise RecipeError("--routed-share must be in (0, 1] and --noise >= 0.")
    with claim_output(args.output, [args.model], args.overwrite):
        read_config(args.model, args.trust_remote_code)
        try:
            dense = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the dense model '{args.model}': {exc}") from exc
        moe = upcycle_dense_to_mote(dense, args.experts, args.top_k, args.routed_share, args.noise)
        with atomic_folder(args.output, [args.model], args.overwrite, kind="model") as tmp:
            moe.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return {
        "output": str(Path(args.output).resolve()),
        "experts": args.experts,
        "top_k": args.top_k,
        "next": f"moecompress compress {args.output} --recipe pipelines/ternary-experts.yaml (recovery.teacher: {args.model})",
    }


def cmd_plan(args) -> dict:
    from .calibration.batches import calibration_batches
    from .stages import plan_allocation
    from .storage.outputs import atomic_folder, claim_output

    recipe = _recipe_with_overrides(args)
    if recipe.allocation.method == "uniform":
        recipe.allocation.method = "lp"
        recipe.validate()
    with claim_output(args.output, [args.model], args.overwrite):
        loaded = _open_model(args)
        plan, stats = plan_allocation(
            loaded, recipe, calibration_batches(loaded, recipe.calibration, args.trust_remote_code)
        )
        with atomic_folder(args.output, [args.model], args.overwrite, kind="plan") as tmp:
            stats.save(tmp)
            plan.save(tmp / "plan.json")
            plan.heatmap(tmp / "plan.png")
    print(plan.table(), file=sys.stderr)
    return {
        "output": str(Path(args.output).resolve()),
        "average_bits": plan.average_bits,
        "method": plan.method,
        **plan.details,
    }


def cmd_analyze(args) -> dict:
    from .analysis.importance import write_analysis
    from .calibration.batches import activation_holding, calibration_batches
    from .calibration.engine import Walk, collect_expert_stats
    from .storage.outputs import atomic_folder, claim_output

    recipe = _recipe_with_overrides(args)
    recipe.calibration.seq_len = args.seq_len
    with claim_output(args.output, [args.model], args.overwrite):
        loaded = _open_model(args)
        batches = calibration_batches(loaded, recipe.calibration, args.trust_remote_code)
        with activation_holding(recipe.calibration) as holding:
            stats = collect_expert_stats(
                loaded.model,
                loaded.adapter,
                batches,
                args.model,
                measure_drop_loss=not args.no_drop_loss,
                walk=Walk(recipe.device, desc="analyze", layers_from=loaded, activations=holding),
            )
        with atomic_folder(args.output, [args.model], args.overwrite, kind="analysis") as tmp:
            files = sorted(p.name for p in write_analysis(stats, tmp).iterdir())
    return {"output": str(Path(args.output).resolve()), "files": files}


def cmd_eval_ppl(args) -> dict:
    from .evaluation.perplexity import perplexity
    from .runtime import native

    _check_record_target(args)
    model, processor, _ = _load_for_eval(args.model, args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    results = {}
    with native.float32_activations():  # quality numbers: the stored format's arithmetic, not int8 rounding
        for d in args.data:
            _reset_skip_stats(model)
            results[data_label(d)] = {
                **perplexity(model, tokenizer, d, args.seq_len, args.batch_size, args.max_windows).to_dict(),
                **_skip_stats(model),
            }
    return _record(args, "ppl", results)


def _reset_skip_stats(model) -> None:
    if hasattr(model, "skip_controller"):
        model.skip_controller.reset_stats()


def _skip_stats(model) -> dict:
    """Fraction of routed-expert activations a dynamic-skipping checkpoint removed during the evaluation."""
    controller = getattr(model, "skip_controller", None)
    if controller is None:
        return {}
    stats = controller.stats
    return {
        "expert_activations_skipped": stats.skipped(),
        **{f"skipped_{m}": stats.skipped(m) for m in ("text", "image") if stats.total[m]},
    }


def cmd_eval_vlqa(args) -> dict:
    from .evaluation.vlqa import vl_qa_accuracy
    from .runtime import native

    _check_record_target(args)
    model, processor, _ = _load_for_eval(args.model, args.trust_remote_code)
    _reset_skip_stats(model)
    with native.float32_activations():
        result = vl_qa_accuracy(
            model,
            processor,
            args.data,
            args.batch_size,
            args.max_items,
            **({"prompt": args.prompt} if args.prompt else {}),
        )
    return _record(args, "vlqa", {data_label(args.data): {**result.to_dict(), **_skip_stats(model)}})


def cmd_eval_lm(args) -> dict:
    from .evaluation.lm_tasks import lm_eval_tasks
    from .runtime import native

    _check_record_target(args)
    model, processor, _ = _load_for_eval(args.model, args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    tasks = [t for t in args.tasks.split(",") if t]
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    with native.float32_activations():
        results = lm_eval_tasks(model, tokenizer, tasks, args.include_path, limit, args.num_fewshot, args.batch_size)
    return _record(args, "lm_eval", results)


def cmd_eval_efficiency(args) -> dict:
    from .evaluation.efficiency import measure_efficiency
    from .evaluation.perplexity import evaluation_stream
    from .models import get_adapter

    _check_record_target(args)
    # The packed path as deployed: the expert kernels, no dense copies.
    model, processor, seconds = _load_for_eval(
        args.model, args.trust_remote_code, False, args.dtype, args.dense_kernels
    )
    tokens = evaluation_stream(args.data, getattr(processor, "tokenizer", processor))
    result = measure_efficiency(
        model,
        get_adapter(model.config.model_type),
        args.model,
        tokens,
        seconds,
        args.prefill_tokens,
        args.decode_tokens,
        compile_decode=args.decode == "compiled",
    )
    return _record(args, "efficiency", result.to_dict())


def cmd_generate(args) -> dict:
    from .runtime.decode import Decoder

    model, processor, seconds = _load_for_eval(args.model, args.trust_remote_code, False, args.dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    decoder = Decoder(model, compile=not args.eager, threads=args.threads)
    tokens, stats = decoder.generate(prompt, args.max_new_tokens, tokenizer.eos_token_id)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    logging.info("%s%s", args.prompt, text)
    logging.info(
        "first token %.3f s, compile %.1f s, %.1f tokens/s (%s)",
        stats.prefill_s,
        stats.compile_s,
        stats.tokens_per_s,
        stats.path,
    )
    return {"text": text, "tokens": tokens, "load_seconds": round(seconds, 2), **stats.to_dict()}


def cmd_report(args) -> dict:
    from .evaluation.records import read_record
    from .report import write_report
    from .storage.outputs import atomic_folder

    records = [read_record(r) for r in args.runs]
    base = read_record(args.base) if args.base else None
    with atomic_folder(args.output, [*args.runs, args.base], args.overwrite, kind="report") as tmp:
        written = write_report(records, tmp, base, args.title)
    return {name: str(Path(args.output).resolve() / path.name) for name, path in written.items()}


def cmd_export(args) -> dict:
    from .errors import RecipeError
    from .hub import prepare_hub_folder, upload
    from .io.interop import export_interop

    if args.format == "gguf":
        from .io.gguf_export import export_gguf

        if args.hub:
            raise RecipeError("--hub uploads checkpoint folders; write the .gguf file first, then upload it yourself.")
        output = args.output or f"{str(args.checkpoint).rstrip('/')}.gguf"
        return export_gguf(args.checkpoint, output, args.type, args.overwrite, args.ternary_type)
    if args.type is not None or args.ternary_type is not None:
        raise RecipeError("--type and --ternary-type are for --format gguf: other formats keep the checkpoint's types.")
    output = args.output or f"{str(args.checkpoint).rstrip('/')}-{args.format}"
    if not args.hub:
        if args.format == "moecompress":
            raise RecipeError("nothing to export: pass --format compressed-tensors|gptq to convert, or --hub REPO_ID.")
        return {
            "output": str(export_interop(args.checkpoint, output, args.format, args.overwrite)),
            "format": args.format,
        }
    base = None
    if args.base:
        from .evaluation.records import read_record

        base = read_record(args.base)
    folder = prepare_hub_folder(args.checkpoint, output, args.hub, args.format, args.base_model, base, args.overwrite)
    result = {"output": str(folder), "format": args.format, "files": sorted(p.name for p in folder.iterdir())}
    if args.dry_run:
        return {**result, "uploaded": False}
    return {**result, "uploaded": True, "commit": upload(folder, args.hub, args.private, args.token, args.endpoint)}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage + message."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _size(text: str) -> int:
    """A byte count such as 5GB, 500MB, 2GiB or 1000000."""
    from .calibration.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _open_model(args):
    """The source for a layer-wise pass: streamed from disk (one layer in memory), or loaded whole with --no-stream."""
    from .models import load_model
    from .models.streaming import open_streamed

    if args.no_stream:
        return load_model(args.model, trust_remote_code=args.trust_remote_code)
    return open_streamed(args.model, trust_remote_code=args.trust_remote_code)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; use an integer >= {minimum}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moecompress", description="Compress Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_compress,
        _add_plan,
        _add_analyze,
        _add_upcycle,
        _add_eval,
        _add_generate,
        _add_export,
        _add_report,
    ):
        add(sub)
    return parser


def _common(p):
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom code shipped with the model/processor"
    )
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="register a third-party model adapter (repeatable); installed plugins are found through "
        "the 'moecompress.adapters' entry point group",
    )


def _overwrite(p):
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier moecompress output at -o (anything else there is never replaced)",
    )


def _no_stream(p):
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="load the whole model in memory (float32) instead of one decoder layer at a time",
    )


def _record_options(p):
    _common(p)
    p.add_argument(
        "--record",
        help="run record to add the results to (default: the checkpoint's run.json; "
        "required to keep results of an uncompressed model)",
    )
    p.add_argument("--name", help="name of a new run record (default: the model folder's name)")
    p.add_argument("--no-record", action="store_true", help="do not write the results to any run record")


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="quantize the routed experts and write a packed checkpoint")
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--recipe", help="YAML recipe (pipelines/*.yaml); default: GPTQ w4 g128")
    p.add_argument("-o", "--output", required=True, help="output folder: a new path (written atomically)")
    p.add_argument("--calib", help="override calibration.dataset (jsonl/txt file or hub dataset)")
    p.add_argument("--vl-calib", help="override calibration.vl_dataset (image+text jsonl)")
    p.add_argument("--num-samples", type=_at_least(1), help="override calibration.num_samples")
    p.add_argument("--device", help="compute device for the layer being processed (cpu, cuda, cuda:1)")
    p.add_argument(
        "--max-memory",
        type=_size,
        help="peak memory of the streamed run, e.g. 6GB (calibration.max_memory); a layer whose experts do not fit "
        "is worked on a chunk of experts at a time. Default: most of the free memory",
    )
    p.add_argument(
        "--experts-per-chunk",
        type=_at_least(1),
        help="work on every MoE layer this many routed experts at a time (calibration.experts_per_chunk); "
        "default: as the memory budget allows",
    )
    p.add_argument(
        "--ranks",
        type=_at_least(1),
        default=1,
        help="expert-parallel processes on this machine, each working on its share of every layer's experts "
        "(as `torchrun --nproc-per-node N -m moecompress compress ...`, which also works, over several machines too)",
    )
    p.add_argument(
        "--backend", help="torch.distributed backend of a job on several ranks (default: gloo on CPU, nccl on cuda)"
    )
    p.add_argument("--plan", help="plan.json from `moecompress plan` (bits per expert); skips the allocation")
    p.add_argument(
        "--avg-bits", type=_positive_float, help="override allocation.avg_bits (factor.avg_bits in a factor recipe)"
    )
    p.add_argument(
        "--recovery-steps", type=_at_least(0), help="override recovery.steps (0 turns recovery training off)"
    )
    p.add_argument("--max-shard-size", type=_size, default=5 * 10**9, help="largest weight file (default 5GB)")
    _overwrite(p)
    _no_stream(p)
    _common(p)
    p.set_defaults(run=cmd_compress)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="profile quantization error per expert and allocate bits (integer program)")
    p.add_argument("model")
    p.add_argument("--recipe", help="recipe with an `allocation` section (method lp when left uniform)")
    p.add_argument("-o", "--output", required=True, help="folder for plan.json, plan.png, expert_stats.safetensors")
    p.add_argument("--avg-bits", type=_positive_float, help="override allocation.avg_bits")
    p.add_argument("--calib")
    p.add_argument("--vl-calib")
    p.add_argument("--num-samples", type=_at_least(1))
    p.add_argument("--device")
    _overwrite(p)
    _no_stream(p)
    _common(p)
    p.set_defaults(run=cmd_plan)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="expert importance (frequency, weight, contribution, drop loss) per modality")
    p.add_argument("model")
    p.add_argument("--calib", help="calibration text (default: the recipe default calib_mix.jsonl)")
    p.add_argument("--vl-calib", help="image+text jsonl for VL models")
    p.add_argument("--num-samples", type=_at_least(1), default=64)
    p.add_argument("--seq-len", type=_at_least(2), default=512)
    p.add_argument("--no-drop-loss", action="store_true", help="skip the drop-one-expert reconstruction loss")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", required=True)
    _overwrite(p)
    _no_stream(p)
    _common(p)
    p.set_defaults(run=cmd_analyze)


def _add_upcycle(sub) -> None:
    p = sub.add_parser("upcycle", help="dense Qwen2 -> Qwen2-MoE with the FFN as full-precision shared expert (MoTE)")
    p.add_argument("model", help="dense model folder or hub id")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--experts", type=_at_least(1), default=8)
    p.add_argument("--top-k", type=_at_least(1), default=2)
    p.add_argument(
        "--routed-share", type=float, default=0.5, help="share of the FFN output given to the routed experts"
    )
    p.add_argument(
        "--noise", type=float, default=0.01, help="relative noise added to each routed copy (breaks symmetry)"
    )
    _overwrite(p)
    _common(p)
    p.set_defaults(run=cmd_upcycle)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or packed checkpoint")
    eval_sub = p.add_subparsers(dest="task", required=True)
    e = eval_sub.add_parser("ppl", help="perplexity over 512-token windows")
    e.add_argument("model")
    e.add_argument("--data", nargs="+", required=True, help="text files (.txt, .jsonl)")
    e.add_argument("--seq-len", type=_at_least(2), default=512)
    e.add_argument("--batch-size", type=_at_least(1), default=8)
    e.add_argument("--max-windows", type=_at_least(1), help="evaluate only the first N windows (default: all)")
    _record_options(e)
    e.set_defaults(run=cmd_eval_ppl)
    e = eval_sub.add_parser("vlqa", help="visual QA exact-match accuracy (image+text jsonl)")
    e.add_argument("model")
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=_at_least(1), default=32)
    e.add_argument("--max-items", type=_at_least(1))
    e.add_argument(
        "--prompt",
        help="prompt template over the jsonl fields, e.g. '{question} Answer:' "
        "(default: the shapes-vl question prompt)",
    )
    _record_options(e)
    e.set_defaults(run=cmd_eval_vlqa)
    e = eval_sub.add_parser(
        "lm", help="lm-evaluation-harness tasks (offline ones in eval/tasks, or any lm-eval task name)"
    )
    e.add_argument("model")
    e.add_argument("--tasks", required=True, help="comma-separated, e.g. moe_wiki_mc,moe_code_mc or hellaswag,arc_easy")
    e.add_argument("--include-path", help="folder of extra task YAMLs (default: the repository's eval/tasks)")
    e.add_argument("--limit", type=_positive_float, help="items per task (an int), or a fraction below 1")
    e.add_argument("--num-fewshot", type=_at_least(0))
    e.add_argument("--batch-size", type=_at_least(1), default=8)
    _record_options(e)
    e.set_defaults(run=cmd_eval_lm)
    e = eval_sub.add_parser(
        "efficiency", help="bytes, bits/param, active params/token, expert activation ratio, load time, tokens/s"
    )
    e.add_argument("model")
    e.add_argument(
        "--data", required=True, help="text whose first tokens are the benchmark prompt (and measure skipping)"
    )
    e.add_argument("--prefill-tokens", type=_at_least(1), default=512)
    e.add_argument("--decode-tokens", type=_at_least(1), default=32)
    e.add_argument(
        "--decode",
        choices=["compiled", "eager"],
        default="compiled",
        help="the decode step compiled with the native kernels inside (runtime/decode.py; compiled once, cached "
        "across runs) or eager; both with a static KV cache",
    )
    e.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the dense weights (a checkpoint's packed experts stay packed; default float32)",
    )
    e.add_argument(
        "--dense-kernels",
        choices=["auto", "native", "torch"],
        default="auto",
        help="what runs the unquantized linear layers on the CPU at decode: the native dense GEMV or torch; "
        "auto (default): native for a moecompress checkpoint, torch for an original model (transformers as it is)",
    )
    _record_options(e)
    e.set_defaults(run=cmd_eval_efficiency)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy text from a checkpoint (or a source model): static KV cache, the decode step compiled with the "
        "native kernels inside (cached across runs), first-token latency and tokens/s",
    )
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the dense weights")
    p.add_argument("--eager", action="store_true", help="do not compile the decode step")
    p.add_argument(
        "--threads",
        type=_at_least(1),
        help="at most this many threads (default: torch's count); fewer while other processes keep cores busy",
    )
    _common(p)
    p.set_defaults(run=cmd_generate)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="convert to compressed-tensors / GPTQ, or prepare and upload a Hub repo with a model card"
    )
    p.add_argument(
        "checkpoint", help="a moecompress checkpoint folder (with --format gguf --type: also a source model)"
    )
    p.add_argument("-o", "--output", help="folder to write (default: <checkpoint>-<format>; gguf: <checkpoint>.gguf)")
    p.add_argument(
        "--format",
        choices=("moecompress", "compressed-tensors", "gptq", "gguf"),
        default="moecompress",
        help="weight layout; compressed-tensors and gptq need one integer bit width for every expert, gguf "
        "(llama.cpp) experts of a llama.cpp type (recipes pipelines/gguf-*.yaml)",
    )
    p.add_argument(
        "--type",
        help="gguf: the type of the tensors outside the routed experts (default: the recipe's gguf section, else "
        "F16); for a source model, of every tensor (F16, BF16, F32, Q8_0, ...)",
    )
    p.add_argument(
        "--ternary-type", help="gguf: TQ1_0 or TQ2_0 for ternary experts (default: the recipe's, else TQ1_0)"
    )
    p.add_argument("--hub", metavar="REPO_ID", help="prepare a Hub repo folder (weights, card, recipe) and upload it")
    p.add_argument("--dry-run", action="store_true", help="with --hub: write the folder only, upload nothing")
    p.add_argument("--private", action="store_true")
    p.add_argument("--base-model", help="Hub id of the source model for the card (default: the run record's source)")
    p.add_argument("--base", help="run record of the base model: the card shows its scores and recovery %%")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.add_argument("--endpoint", help="Hub endpoint (default: huggingface.co or $HF_ENDPOINT)")
    _overwrite(p)
    _common(p)
    p.set_defaults(run=cmd_export)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="compare run records: Markdown + HTML with Pareto, recovery and heatmap plots")
    p.add_argument("runs", nargs="+", help="checkpoint folders (their run.json) or run-record .json files")
    p.add_argument("--base", help="the reference run (e.g. the uncompressed model's record) for recovery %%")
    p.add_argument("-o", "--output", required=True, help="folder for report.md, report.html and the PNGs")
    p.add_argument("--title", default="moecompress report")
    _overwrite(p)
    _common(p)
    p.set_defaults(run=cmd_report)


_STOPPED = []  # SIGTERM seen


def _interrupt(signum, frame):
    from .distributed import launched

    _STOPPED.append(signum)
    if launched():  # `--ranks` stopped this rank after another failed, and says why itself
        logging.disable(logging.CRITICAL)
    raise KeyboardInterrupt


def _launch(args, argv: list[str]) -> int:
    """`--ranks N` without a launcher: run the job as N ranks of this machine (`distributed.spawn`) and end it with
    one line naming the rank that failed, if one did."""
    import tempfile

    from .distributed import backend_problem, default_backend, failed_rank, spawn
    from .storage.layer_store import state_folder

    backend = args.backend or default_backend(args.device or "cpu")
    problem = backend_problem(backend, args.device or "cpu")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="moecompress-ranks-") as logs:
        codes = spawn(argv, args.ranks, Path(logs), backend)
        rank = failed_rank(codes)
        if rank is None and all(code == 0 for code in codes):
            return 0
        if rank == 0:  # it said why itself
            return codes[0]
        said = (Path(logs) / f"rank-{rank}.log").read_text().splitlines() if rank is not None else []
    errors = [line for line in said if line.startswith("error: ")]
    kept = state_folder(args.output)
    resume = f"; the finished layers are kept in {kept}: rerun the same command to resume" if kept.exists() else ""
    if errors:
        print(f"error: rank {rank}: {errors[-1][7:]}", file=sys.stderr)
        return codes[rank]
    how = f"was killed by signal {signal.Signals(-codes[rank]).name}" if rank is not None and codes[rank] < 0 else ""
    how = how or (f"ended with status {codes[rank]}" if rank is not None else "lost each other")
    print(f"error: {'rank ' + str(rank) if rank is not None else 'the ranks'} {how}{resume}.", file=sys.stderr)
    return 1


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    from .distributed import LOST, STOPPED, RankLostError, launched, launched_size
    from .models.registry import load_plugin
    from .storage.outputs import check_file_output, write_text_atomic

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "ranks", 1) > 1 and launched_size() == 1:
        return _launch(args, sys.argv[1:] if argv is None else argv)
    quiet = os.environ.get("RANK", "0") != "0"  # another rank of a distributed job: rank 0 tells what happens
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed job ends like Ctrl-C: temporary files removed
    try:
        if getattr(args, "json", None):
            check_file_output(args.json, "--json")
        for spec in getattr(args, "adapter", []):
            load_plugin(spec)
        result = args.run(args)
        result = {
            "result": result,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": _peak_rss_mb(),
        }
        try:
            text = json.dumps(result, indent=2, allow_nan=False)
        except ValueError:
            raise NonFiniteError(
                "the result holds a NaN or infinite number; nothing was recorded as valid. "
                "Check the model and data that produced it."
            ) from None
        if quiet:  # rank 0 prints and records the result
            return 0
        if getattr(args, "json", None):
            write_text_atomic(args.json, text)
    except RankLostError as exc:
        if not launched():  # a launched rank leaves it to `--ranks`, which names the rank that failed
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return LOST
    except MoECompressError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, ... while reading or writing
        print(
            f"error: {_one_line(exc)}. Free space or fix the permissions, then run the command again.", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        if _STOPPED and launched():  # stopped by `--ranks` after another rank failed
            return STOPPED
        print(
            "error: interrupted; nothing was written at the output path (an earlier output there is unchanged).",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
