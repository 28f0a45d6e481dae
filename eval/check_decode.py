"""The compiled decode step (runtime/decode.py) on every architecture of the test matrix (tests/models/tiny_models.py,
tiny random models, RTN w4 g16 checkpoints): whether it takes the compiled path or falls back (and why), whether
its greedy tokens are today's path's (transformers' generate on the same loaded checkpoint), compile seconds, and
eager vs compiled tokens/s of the tiny model (a check of the path, not a benchmark: eval/bench_decode.py is). The logits errors are
the largest relative error of one position's logits against transformers' generate, both fed its tokens: greedy
tokens of a random model can flip on a near-tie, the logits say whether the step computes the same function.

    python eval/check_decode.py [--types qwen3_moe gpt_oss ...] [--tokens 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.sweep import one_line  # noqa: E402
from tests.models.tiny_models import CONFIGS, tiny_model  # noqa: E402


def check(model_type: str, work: Path, tokens: int) -> dict:
    import moecompress
    from moecompress.calibration.batches import CalibrationBatch
    from moecompress.recipe import Recipe
    from moecompress.runtime.decode import Decoder

    tiny_model(model_type).save_pretrained(work / "src")
    ids = torch.randint(3, 110, (4, 48), generator=torch.Generator().manual_seed(0))
    batch = CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids).bool())
    recipe = Recipe.from_dict({"name": "w4", "quantization": {"method": "rtn", "bits": 4, "group_size": 16}})
    with mock.patch("moecompress.pipeline.calibration_batches", lambda *a, **k: [batch]):
        moecompress.compress(str(work / "src"), recipe, work / "w4", progress=False, overwrite=True)
    model = moecompress.load(work / "w4")
    prompt = torch.randint(3, 110, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    today, today_logits = out.sequences[0, 16 : 16 + tokens].tolist(), torch.cat(out.logits[:tokens]).float()
    eager_decoder = Decoder(model, 16 + tokens, compile=False)
    eager_tokens, eager = eager_decoder.generate(prompt, tokens)
    eager_logits = rel(eager_decoder.score(prompt, today), today_logits) if eager_decoder.static else None
    decoder = Decoder(model, 16 + tokens)  # (switches the model to eager attention where it compiles)
    compiled_tokens, first = decoder.generate(prompt, tokens)
    _, again = decoder.generate(prompt, tokens)
    return {
        "path": "compiled" if decoder.compiled else f"eager: {decoder.fallback}",
        "eager == today": eager_tokens == today,
        "compiled == today": compiled_tokens == today,
        "eager logits": eager_logits,
        "compiled logits": rel(decoder.score(prompt, today), today_logits) if decoder.static else None,
        "compile_s": first.compile_s,
        "eager tok/s": eager.tokens_per_s,
        "compiled tok/s": again.tokens_per_s if decoder.compiled else float("nan"),
    }


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest relative error of one position's logits, fed today's tokens."""
    return float(((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=sorted(CONFIGS))
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    print(
        "| model type | path | eager == today | compiled == today | eager logits err | compiled logits err | compile s "
        "| eager tok/s | compiled tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_type in args.types:
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as work:
            try:
                r = check(model_type, Path(work), args.tokens)
            except Exception as exc:  # noqa: BLE001 - one family's failure is a row of the table
                print(f"| {model_type} | fails: {one_line(exc)} | | | | | | | |", flush=True)
                continue
        errors = [f"{r[k]:.1e}" if r[k] is not None else "- (generate)" for k in ("eager logits", "compiled logits")]
        cells = [r["path"], r["eager == today"], r["compiled == today"], *errors, f"{r['compile_s']:.1f}"]
        cells += [f"{r['eager tok/s']:.0f}", f"{r['compiled tok/s']:.0f}"]
        print(f"| {model_type} | {' | '.join(map(str, cells))} |", flush=True)


if __name__ == "__main__":
    main()
