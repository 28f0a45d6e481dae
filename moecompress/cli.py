"""`moecompress analyze|compress|eval ...` command line."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

from .errors import MoECompressError


def _load_for_eval(path: str, trust_remote_code: bool):
    """A packed checkpoint (moecompress.json present) or any supported original model."""
    from .api import load
    from .io.checkpoint import MANIFEST
    from .models import get_adapter, load_model, read_config
    from .pipeline import load_tokenizer_or_processor

    config = read_config(path, trust_remote_code)
    multimodal = get_adapter(config.model_type).is_multimodal
    if (Path(path) / MANIFEST).is_file():
        model = load(path, cache_dequantized=True, trust_remote_code=trust_remote_code)
    else:
        model = load_model(path, trust_remote_code=trust_remote_code).model
    return model, load_tokenizer_or_processor(path, multimodal, trust_remote_code)


def cmd_compress(args) -> dict:
    from .pipeline import compress

    recipe = _recipe_with_overrides(args)
    result = compress(args.model, recipe, args.output, trust_remote_code=args.trust_remote_code, plan=args.plan)
    report = result.report.to_dict()
    report["rare_experts"] = len(report["rare_experts"])
    return report


def _recipe_with_overrides(args):
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe) if getattr(args, "recipe", None) else Recipe()
    for key, value in (("dataset", args.calib), ("vl_dataset", args.vl_calib), ("num_samples", args.num_samples)):
        if value:
            setattr(recipe.calibration, key, value)
    if getattr(args, "avg_bits", None):
        recipe.allocation.avg_bits = args.avg_bits
    if getattr(args, "recovery_steps", None) is not None:
        recipe.recovery.enabled = args.recovery_steps > 0
        recipe.recovery.steps = max(args.recovery_steps, 1)
    if getattr(args, "device", None):
        recipe.device = args.device
    return recipe.validate()


def cmd_upcycle(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .errors import ModelLoadError
    from .io.checkpoint import atomic_folder
    from .training.upcycle import upcycle_dense_to_mote

    try:
        dense = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the dense model '{args.model}': {exc}") from exc
    moe = upcycle_dense_to_mote(dense, args.experts, args.top_k, args.routed_share, args.noise)
    with atomic_folder(Path(args.output)) as tmp:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"output": str(Path(args.output).resolve()), "experts": args.experts, "top_k": args.top_k,
            "next": f"moecompress compress {args.output} --recipe pipelines/ternary-experts.yaml (recovery.teacher: {args.model})"}


def cmd_plan(args) -> dict:
    from .models import load_model
    from .pipeline import calibration_batches, plan_allocation

    recipe = _recipe_with_overrides(args)
    if recipe.allocation.method == "uniform":
        recipe.allocation.method = "lp"
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    plan, stats = plan_allocation(loaded, recipe, calibration_batches(loaded, recipe, args.trust_remote_code))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    plan.save(out / "plan.json")
    plan.heatmap(out / "plan.png")
    print(plan.table(), file=sys.stderr)
    return {"output": str(out), "average_bits": plan.average_bits, "method": plan.method, **plan.details}


def cmd_analyze(args) -> dict:
    from .analysis.importance import write_analysis
    from .calibration.engine import collect_expert_stats
    from .models import load_model
    from .pipeline import calibration_batches

    recipe = _recipe_with_overrides(args)
    recipe.calibration.seq_len = args.seq_len
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    batches = calibration_batches(loaded, recipe, args.trust_remote_code)
    stats = collect_expert_stats(loaded.model, loaded.adapter, batches, args.model,
                                 measure_drop_loss=not args.no_drop_loss, device=recipe.device)
    out = write_analysis(stats, args.output)
    return {"output": str(out), "files": sorted(p.name for p in out.iterdir())}


def cmd_eval_ppl(args) -> dict:
    from .evaluation.perplexity import perplexity

    model, processor = _load_for_eval(args.model, args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    results = {}
    for d in args.data:
        _reset_skip_stats(model)
        results[Path(d).stem] = {**perplexity(model, tokenizer, d, args.seq_len, args.batch_size, args.max_windows).to_dict(),
                                 **_skip_stats(model)}
    return results


def _reset_skip_stats(model) -> None:
    if hasattr(model, "skip_controller"):
        model.skip_controller.reset_stats()


def _skip_stats(model) -> dict:
    """Fraction of routed-expert activations a dynamic-skipping checkpoint removed during the evaluation."""
    controller = getattr(model, "skip_controller", None)
    if controller is None:
        return {}
    stats = controller.stats
    return {"expert_activations_skipped": stats.skipped(),
            **{f"skipped_{m}": stats.skipped(m) for m in ("text", "image") if stats.total[m]}}


def cmd_eval_vlqa(args) -> dict:
    from .evaluation.vlqa import vl_qa_accuracy

    model, processor = _load_for_eval(args.model, args.trust_remote_code)
    _reset_skip_stats(model)
    result = vl_qa_accuracy(model, processor, args.data, args.batch_size, args.max_items)
    return {**result.to_dict(), **_skip_stats(model)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecompress", description="Compress Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--trust-remote-code", action="store_true", help="allow custom code shipped with the model/processor")
        p.add_argument("--json", help="also write the result as JSON to this file")

    p = sub.add_parser("compress", help="quantize the routed experts and write a packed checkpoint")
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--recipe", help="YAML recipe (pipelines/*.yaml); default: GPTQ w4 g128")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--calib", help="override calibration.dataset (jsonl/txt file or hub dataset)")
    p.add_argument("--vl-calib", help="override calibration.vl_dataset (image+text jsonl)")
    p.add_argument("--num-samples", type=int, help="override calibration.num_samples")
    p.add_argument("--device", help="compute device for the layer being processed (cpu, cuda, cuda:1)")
    p.add_argument("--plan", help="plan.json from `moecompress plan` (bits per expert); skips the allocation")
    p.add_argument("--avg-bits", type=float, help="override allocation.avg_bits")
    p.add_argument("--recovery-steps", type=int, help="override recovery.steps (0 turns recovery training off)")
    common(p)
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("plan", help="profile quantization error per expert and allocate bits (integer program)")
    p.add_argument("model")
    p.add_argument("--recipe", help="recipe with an `allocation` section (method lp when left uniform)")
    p.add_argument("-o", "--output", required=True, help="folder for plan.json, plan.png, expert_stats.safetensors")
    p.add_argument("--avg-bits", type=float, help="override allocation.avg_bits")
    p.add_argument("--calib")
    p.add_argument("--vl-calib")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--device")
    common(p)
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("analyze", help="expert importance (frequency, weight, contribution, drop loss) per modality")
    p.add_argument("model")
    p.add_argument("--calib", help="calibration text (default: the recipe default calib_mix.jsonl)")
    p.add_argument("--vl-calib", help="image+text jsonl for VL models")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--no-drop-loss", action="store_true", help="skip the drop-one-expert reconstruction loss")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", required=True)
    common(p)
    p.set_defaults(run=cmd_analyze)

    p = sub.add_parser("upcycle", help="dense Qwen2 -> Qwen2-MoE with the FFN as full-precision shared expert (MoTE)")
    p.add_argument("model", help="dense model folder or hub id")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--routed-share", type=float, default=0.5, help="share of the FFN output given to the routed experts")
    p.add_argument("--noise", type=float, default=0.01, help="relative noise added to each routed copy (breaks symmetry)")
    common(p)
    p.set_defaults(run=cmd_upcycle)

    p = sub.add_parser("eval", help="evaluate a model or packed checkpoint")
    eval_sub = p.add_subparsers(dest="task", required=True)
    e = eval_sub.add_parser("ppl", help="perplexity over 512-token windows")
    e.add_argument("model")
    e.add_argument("--data", nargs="+", required=True, help="text files (.txt, .jsonl)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-windows", type=int)
    common(e)
    e.set_defaults(run=cmd_eval_ppl)
    e = eval_sub.add_parser("vlqa", help="visual QA exact-match accuracy (image+text jsonl)")
    e.add_argument("model")
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-items", type=int)
    common(e)
    e.set_defaults(run=cmd_eval_vlqa)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        result = args.run(args)
    except MoECompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"result": result, "wall_seconds": round(time.perf_counter() - start, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    text = json.dumps(result, indent=2)
    print(text)
    if getattr(args, "json", None):
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
