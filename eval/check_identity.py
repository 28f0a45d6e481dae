"""Identity check for refactors: sha256 of every stored tensor for every shipped recipe, before vs after.

Runs `moecompress compress` with each recipe in `pipelines/` (text recipes on moe-tiny-text, `*-vl` ones on
moe-tiny-vl) from the tree given by --tree (its package is put first on PYTHONPATH), and writes one JSON of
{recipe: {tensor name: sha256, "quantization_config": sha256}}. With --compare A.json B.json it prints the
recipes and tensors that differ and exits 1 if any do.

    python eval/check_identity.py --tree /tmp/base -o /tmp/id-before.json      # a checkout of the old commit
    python eval/check_identity.py --tree . -o /tmp/id-after.json
    python eval/check_identity.py --compare /tmp/id-before.json /tmp/id-after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                hashes[name] = hashlib.sha256(t.view(-1).view(torch.uint8).numpy()).hexdigest()
    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    hashes["quantization_config"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return hashes


def run_recipe(tree: Path, recipe: Path, out: Path) -> float:
    vl = recipe.stem.endswith("-vl")
    model = tree.resolve().parent / "shared" / "models" / ("moe-tiny-vl" if vl else "moe-tiny-text")
    cmd = [sys.executable, "-c", "import sys; from moecompress.cli import main; sys.exit(main())", "compress"]
    cmd += [str(model), "--recipe", str(recipe.resolve()), "-o", str(out.resolve()), "--overwrite"]
    cmd += ["--trust-remote-code"] if vl else []
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    start = time.perf_counter()
    # cwd: `python -c` puts the working directory first on sys.path, which would shadow --tree's package
    child = subprocess.run(
        cmd, env=env, cwd=tree.resolve(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if child.returncode != 0:
        raise SystemExit(f"{recipe.name} failed with the tree {tree}: {child.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    bad = 0
    for recipe in sorted(set(a) | set(b)):
        if recipe not in a or recipe not in b:
            print(f"{recipe:24s} only in {a_path if recipe in a else b_path}")
            continue
        ta, tb = a[recipe], b[recipe]
        diff = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        bad += bool(diff)
        print(f"{recipe:24s} {len(tb):5d} tensors  " + ("identical" if not diff else f"DIFFER: {diff[:5]}"))
    return 1 if bad else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, default=Path("."), help="source tree whose moecompress runs the recipes")
    p.add_argument("--recipes", nargs="*", help="recipe names (default: every pipelines/*.yaml of --tree)")
    p.add_argument("--work", type=Path, default=Path("/tmp/moecompress-identity"), help="where checkpoints go")
    p.add_argument("-o", "--output", type=Path, help="JSON of the hashes")
    p.add_argument("--compare", nargs=2, metavar="JSON")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    package = subprocess.run(
        [sys.executable, "-c", "import moecompress; print(moecompress.__file__)"],
        env={**os.environ, "PYTHONPATH": str(args.tree.resolve())},
        cwd=args.tree.resolve(),
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not package.startswith(str(args.tree.resolve()) + os.sep):
        raise SystemExit(f"the runs would import {package}, not the package of --tree {args.tree}")
    print(f"package: {package}", flush=True)
    recipes = sorted((args.tree / "pipelines").glob("*.yaml"))
    recipes = [r for r in recipes if not args.recipes or r.stem in args.recipes]
    result = {}
    for recipe in recipes:
        out = args.work / recipe.stem
        seconds = run_recipe(args.tree, recipe, out)
        result[recipe.stem] = tensor_hashes(out)
        print(f"{recipe.stem:24s} {len(result[recipe.stem]):5d} tensors hashed  ({seconds:.0f} s)", flush=True)
        if args.output:
            args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
