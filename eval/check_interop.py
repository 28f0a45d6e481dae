"""Export a uniform-bit checkpoint as compressed-tensors and GPTQ v1, load each with an independent client and
compare its logits with moecompress's own loader on the same random token batch.

  python eval/check_interop.py out/tiny-w4-sym
  python eval/check_interop.py out/tiny-w4-sym --gptqmodel-python /path/to/venv/bin/python   # GPTQModel in its own env

compressed-tensors: transformers + compressed-tensors in this process (float32 and bfloat16).
GPTQ v1: GPTQModel (torch kernel, CPU) in the interpreter given, which must have gptqmodel installed; GPTQModel's
CPU kernel runs in float16/bfloat16 only, so that comparison is at bfloat16. The bfloat16 noise floor printed
is moecompress bfloat16 vs moecompress float32.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moecompress import load
from moecompress.io.interop import export_interop

GPTQMODEL_SNIPPET = """
import sys, torch
from gptqmodel import GPTQModel, BACKEND
m = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(m.model(input_ids=ids).logits.float(), sys.argv[3])
"""


def compare(name: str, logits: torch.Tensor, reference: torch.Tensor) -> dict:
    return {
        "client": name,
        "rel_l2": float((logits - reference).norm() / reference.norm()),
        "max_abs": float((logits - reference).abs().max()),
        "argmax_agree": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--gptqmodel-python", help="python executable of an environment with gptqmodel installed")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    ours = {
        dt: load(args.checkpoint, dtype=dt)(input_ids=ids).logits.float().detach()
        for dt in (torch.float32, torch.bfloat16)
    }
    rows = [compare("moecompress bf16 (noise floor)", ours[torch.bfloat16], ours[torch.float32])]
    with tempfile.TemporaryDirectory() as tmp:
        ct = export_interop(args.checkpoint, Path(tmp) / "ct", "compressed-tensors")
        for dt in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(str(ct), dtype=dt)
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            rows.append(compare(f"transformers+compressed-tensors {str(dt)[6:]}", logits, ours[dt]))
        if args.gptqmodel_python:
            gptq = export_interop(args.checkpoint, Path(tmp) / "gptq", "gptq")
            torch.save(ids, Path(tmp) / "ids.pt")
            subprocess.run(
                [
                    args.gptqmodel_python,
                    "-c",
                    GPTQMODEL_SNIPPET,
                    str(gptq),
                    str(Path(tmp) / "ids.pt"),
                    str(Path(tmp) / "gptq_logits.pt"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            rows.append(
                compare("GPTQModel torch kernel bf16", torch.load(Path(tmp) / "gptq_logits.pt"), ours[torch.bfloat16])
            )
    print(f"{'client':40s} | {'rel L2 vs moecompress':>21s} | {'max |diff|':>10s} | argmax agree")
    print("-" * 92)
    for r in rows:
        print(f"{r['client']:40s} | {r['rel_l2']:21.2e} | {r['max_abs']:10.4f} | {100 * r['argmax_agree']:.1f} %")


if __name__ == "__main__":
    sys.exit(main())
