"""Every MoE family of the installed transformers (found, not listed: each model type whose modeling file builds its
experts with `use_experts_implementation`, and each type a family file claims), as a tiny random model
(tests/models/tiny_models.py: the hand-written configs of the family files' types, else the config class's defaults
shrunk: 8 experts of top-2, small widths, four layers of every kind the family has, towers of one block). Per family:
- adapter: its family file, or the generic adapter (moecompress/models/generic.py);
- routing recomputed: the rule the generic adapter recognized from the routing it observed (what drop-loss importance,
  merging and pruning recompute), or "observed only" (quantization, allocation, ternary, factoring and packing read the
  observed routing and run; the methods that recompute routing refuse);
- engine vs forward: the layer-wise engine's largest relative error against the model's own forward, all layers;
- rtn w4 round trip: the streamed pipeline (one layer at a time from disk) with RTN w4 g16, loaded back: the largest
  relative difference of its experts from the same RTN applied in memory (what was written is what loads), and the
  logits' error against the float32 original next to the error with every routed expert zeroed (the scale: random
  models are chaotic, only the ratio to it means something);
- from_pretrained == load: transformers' `from_pretrained` gives `moecompress.load`'s logits bit for bit (every
  checkpoint of the row);
- with --full: GPTQ w4 g16 (symmetric), LP mixed precision at 2.5 bits (2/3/4), ternary PTQ (base-3), and whether the
  compressed-tensors export of the w4 checkpoint loads in transformers (its logits' difference from ours);
- or the one-line reason the family is refused.

    python eval/check_architectures.py [--types qwen3_moe gemma4 ...] [--full] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tiny models and the sweep of the test suite
from tests.models.sweep import FAST, FULL, moe_model_types, passes, run  # noqa: E402


def table_line(model_type: str, r: dict, recipes: dict) -> str:
    if "refused" in r:
        return f"| {model_type} | | {'refused' if r['ours'] else 'fails'}: {r['refused']} |"
    cells = [
        r["adapter"],
        r["routing"],
        f"{r['walk']:.1e}",
        f"{r['round trip']:.1e}",
        *(f"{r[n]:.3f}" for n in recipes),
    ]
    cells.append(f"{r['scale']:.3f}")
    cells.append("yes" if r["identical"] else "NO")
    if "compressed-tensors" in r:
        cells.append(r["compressed-tensors"])
    return f"| {model_type} | {' | '.join(cells)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=None, help="model types (default: every MoE family found)")
    parser.add_argument("--full", action="store_true", help="also GPTQ w4, mc 2.5, ternary and compressed-tensors")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    recipes = {**FAST, **(FULL if args.full else {})}
    types = args.types or moe_model_types()
    extra = ["compressed-tensors (w4)"] if args.full else []
    header = [
        "family",
        "adapter",
        "routing recomputed",
        "engine vs forward",
        "rtn w4 round trip",
        *recipes,
        "experts zeroed",
    ]
    header += ["from_pretrained == load", *extra]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in types:
            rows[model_type] = run(model_type, (args.work or Path(tmp)) / model_type, recipes)
            print(table_line(model_type, rows[model_type], recipes), flush=True)
    good = [t for t, r in rows.items() if "refused" not in r and passes(r)]
    print(
        f"\n{len(good)} of {len(rows)} families pass (engine vs forward <= 1e-5, streamed RTN w4 round trip, "
        f"from_pretrained == load); {sum(rows[t]['adapter'] == 'generic' for t in good)} of them with no family file; "
        f"{sum('refused' in r and r['ours'] for r in rows.values())} refused by moecompress, "
        f"{len(rows) - len(good) - sum('refused' in r and r['ours'] for r in rows.values())} other."
    )


if __name__ == "__main__":
    main()
