"""Factored experts (issue 20, first measurement) on moe-tiny-text: every MoE layer's experts as a shared base (their
routing-frequency-weighted mean) plus a low-rank delta per expert, at 75 % and 50 % of the dense expert
parameters, the delta truncated plainly or whitened by each expert's own input Gram matrix (`merge/factored.py`).
Layer by layer on the calibration set, each layer's inputs from the already factored layers before it (as GPTQ
runs). The factored weights are written back dense: this measures the method's quality at its parameter count,
before a stored format exists. Perplexity on the first `--max-windows` 512-token windows of each set, comparable
with `eval/bench_merge.py --max-windows 40` (pruning and averaging at the same parameter counts).

    python eval/bench_factored.py --max-windows 40 --live-only --alpha 0.5     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_foundation import SHARED, TEXT, perplexities
from transformers import AutoTokenizer

from moecompress.calibration.batches import calibration_batches
from moecompress.calibration.engine import run_layerwise
from moecompress.merge.factored import factor_experts, rank_for_budget
from moecompress.models import load_model
from moecompress.models.base import PROJECTIONS
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")


def expert_ranks(freqs: torch.Tensor, live: torch.Tensor, rank: int, alpha: float, full: int) -> list[int]:
    """Per expert a delta rank: `rank` for every live expert, or with `alpha` > 0 the same total shared in
    proportion to routing frequency ** alpha (at most `full`, where the factors stop being smaller than the dense
    delta); 0 for the others."""
    total = rank * int(live.sum())
    if alpha <= 0:
        return [rank if bool(flag) else 0 for flag in live]
    share = freqs.double().clamp(min=0) ** alpha * live
    ranks = torch.zeros(len(share), dtype=torch.long)
    while int(ranks.sum()) < total:  # water-filling: what a capped expert cannot take goes to the others
        open_ = (ranks < full) & (share > 0)
        if not bool(open_.any()):
            break
        left = total - int(ranks.sum())
        add = (share * open_ / (share * open_).sum() * left).floor().long()
        if int(add.sum()) == 0:  # the rounding remainder, one each to the busiest open experts
            add[torch.argsort(share * open_, descending=True)[:left]] = 1
        ranks = torch.minimum(ranks + add * open_, torch.tensor(full))
    return ranks.tolist()


@torch.no_grad()
def factor_model(
    fraction: float, whiten: bool, batches, live_only: bool = False, alpha: float = 0.0
) -> tuple[torch.nn.Module, dict]:
    """moe-tiny-text with every MoE layer's experts factored at `fraction` of their parameters; the delta ranks
    used per layer. `live_only`: experts no calibration token reached keep the base alone (rank 0), and their share
    of the budget goes to the others; `alpha` > 0: ranks in proportion to routing frequency ** alpha."""
    loaded = load_model(str(TEXT))
    ranks: dict = {}

    def factor_layer(view, observer) -> bool:
        experts = range(view.num_experts)
        freqs = observer.tokens.sum(-1)
        live = (freqs > 0) if live_only else torch.ones(view.num_experts, dtype=torch.bool)
        originals = [view.expert_weights(e) for e in experts]
        rebuilt: list[dict[str, torch.Tensor]] = [{} for _ in experts]
        for p in PROJECTIONS:
            out, inp = originals[0][p].shape
            budget = fraction * view.num_experts / int(live.sum())  # the same parameters over the live experts
            rank = rank_for_budget(out, inp, int(live.sum()), budget)
            per_expert = expert_ranks(freqs, live, rank, alpha, out * inp // (out + inp))  # above: dense is smaller
            ranks[view.layer_index] = rank if alpha <= 0 else f"{min(per_expert)}-{max(per_expert)}"
            sums = observer.hessian_mid if p == "down_proj" else observer.hessian_in
            grams = [sums.full(e) for e in experts] if whiten else None
            base, factors = factor_experts([w[p] for w in originals], freqs, max(per_expert), grams)
            for e, (a, b) in enumerate(factors):  # SVD order: the first r columns are the best rank-r delta
                r = per_expert[e]
                rebuilt[e][p] = (base + a[:, :r] @ b[:r]).to(originals[e][p].dtype)
        for e in experts:
            view.set_expert_weights(e, originals[e].replace(**rebuilt[e]))
        return True

    run_layerwise(loaded.model, loaded.adapter, batches, factor_layer, collect_hessians=whiten, progress=False)
    return loaded.model, ranks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.75, 0.5])
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--live-only", action="store_true", help="also: dead experts keep the base alone")
    parser.add_argument("--alpha", type=float, help="also: live experts' ranks by routing frequency ** ALPHA")
    parser.add_argument("--json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    source = load_model(str(TEXT))
    batches = calibration_batches(source, Recipe.from_dict({"calibration": {"dataset": CALIB}}))
    rows = [{"config": "bf16 reference", **perplexities(source.model, tokenizer, args.max_windows)}]
    print(json.dumps(rows[-1]), flush=True)
    variants = [(False, False, 0.0), (True, False, 0.0)] + ([(True, True, 0.0)] if args.live_only else [])
    variants += [(True, True, args.alpha)] if args.alpha else []
    for fraction in args.fractions:
        for whiten, live_only, alpha in variants:
            model, ranks = factor_model(fraction, whiten, batches, live_only, alpha)
            label = f"factored {fraction:.0%}, {'whitened' if whiten else 'plain'}" + (", live experts" * live_only)
            label += f", ranks by frequency^{alpha:g}" if alpha else ""
            rows.append({"config": label, "ranks": ranks, **perplexities(model, tokenizer, args.max_windows)})
            print(json.dumps(rows[-1]), flush=True)
    print("| config | delta rank per MoE layer | wiki | python | kernel |")
    print("|---|---|---|---|---|")
    for row in rows:
        ranks = "/".join(str(r) for r in row["ranks"].values()) if "ranks" in row else ""
        print(f"| {row['config']} | {ranks} | {row['wiki']:.2f} | {row['python']:.2f} | {row['kernel']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
