"""Replay the reliability fault table (issue 34) against a source tree and print what each case gives.

Every case is a hostile input or event: a resume state changed on disk, a checkpoint whose config lost or garbled
its quantization section, a damaged source model, a symlinked export file, concurrent loads and records, a
missing tokenizer, Ctrl-C, an output name too long, ... Each runs in a fresh process with the tree's package first
on PYTHONPATH, on moe-tiny-text from ../shared, and is judged by what a user must get: one `error:` line and status
2 (130 for Ctrl-C) with nothing written, or, where the input is recoverable, a correct result.

    python eval/replay_faults.py --tree /tmp/before        # a checkout of the commit before the fixes
    python eval/replay_faults.py --tree .
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "models" / "moe-tiny-text"
CALIB = SHARED / "data" / "calib" / "calib_mix.jsonl"
WIKI = SHARED / "data" / "wikitext-2" / "test.txt"
QUICK = {
    "name": "quick",
    "calibration": {"dataset": str(CALIB), "num_samples": 2, "seq_len": 64},
    "quantization": {"method": "rtn"},
}
KILL_AFTER_LAYER_1 = """
import os, signal, sys
import moecompress
from moecompress.recipe import Recipe
from moecompress.storage import layer_store
save_layer = layer_store.LayerStore.save_layer
def saved(self, index, *args):
    save_layer(self, index, *args)
    if index == 1:
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)
layer_store.LayerStore.save_layer = saved
moecompress.compress(sys.argv[1], Recipe.from_yaml(sys.argv[3]), sys.argv[2], progress=False)
"""


@dataclass
class Run:
    rc: int
    err: str

    @property
    def last(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""

    def one_error_line(self, status: int = 2) -> bool:
        errors = [line for line in self.err.splitlines() if line.startswith("error: ")]
        return self.rc == status and len(errors) == 1 and self.last == errors[0] and "Traceback" not in self.err


class Replay:
    def __init__(self, tree: Path, work: Path):
        self.tree, self.work = tree.resolve(), work
        self.env = {**os.environ, "PYTHONPATH": str(self.tree), "TOKENIZERS_PARALLELISM": "false"}
        self.recipe = work / "quick.yaml"
        self.recipe.write_text(json.dumps(QUICK))
        self._ckpt: Path | None = None
        self._reference: dict | None = None

    def python(self, code: str, *args, timeout: int = 900) -> Run:
        child = subprocess.run(  # cwd: `python -c` puts it first on sys.path, so it must be the tree
            [sys.executable, "-c", code, *map(str, args)],
            env=self.env,
            cwd=self.tree,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Run(child.returncode, child.stderr)

    def cli(self, *args) -> Run:
        return self.python("import sys; from moecompress.cli import main; sys.exit(main())", *args)

    def fresh(self, name: str) -> Path:
        """An unused path in the work folder: what an earlier case left there (and its state folders) removed."""
        path = self.work / name
        for old in [path, *self.work.glob(f"{name}.*-state")]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def compress(self, source: Path, out: Path, *extra) -> Run:
        return self.cli("compress", source, "--recipe", self.recipe, "-o", out, *extra)

    @property
    def ckpt(self) -> Path:
        if self._ckpt is None:
            self._ckpt = self.fresh("ckpt")
            run = self.compress(TINY, self._ckpt)
            assert run.rc == 0, run.err[-2000:]
        return self._ckpt

    def ckpt_copy(self, name: str) -> Path:
        dest = self.fresh(name)
        shutil.copytree(self.ckpt, dest)
        return dest

    def source_copy(self, name: str) -> Path:
        dest = self.fresh(name)
        shutil.copytree(TINY, dest)
        return dest


def tensor_hashes(folder: Path) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                data = f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy()
                out[key] = hashlib.sha256(data).hexdigest()
    return out


# --- cases: each returns (as a user needs it?, what happened) ---------------------------------------------------


def resumed(r: Replay, damage) -> tuple[bool, str]:
    out = r.fresh("resumed")
    state = Path(str(out) + ".compress-state")
    shutil.rmtree(state, ignore_errors=True)
    killed = r.python(KILL_AFTER_LAYER_1, TINY, out, r.recipe)
    if killed.rc != -signal.SIGKILL:
        return False, f"the killed run ended with {killed.rc}: {killed.last}"
    damage(state)
    run = r.compress(TINY, out)
    if run.rc != 0:
        return False, f"rc {run.rc}: {run.last[:150]}"
    try:
        same = tensor_hashes(out) == tensor_hashes(r.ckpt)
    except Exception as exc:  # noqa: BLE001 - the written checkpoint itself is unreadable
        return False, f"rc 0, and the checkpoint it wrote is unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    said = next((line for line in run.err.splitlines() if "starts over" in line), "no warning")
    return same, ("identical to the uninterrupted run; " if same else "DIFFERS from the uninterrupted run; ") + said


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def refused_everywhere(r: Replay, edit) -> tuple[bool, str]:
    """A garbled quantization_config (its hash in the manifest updated too): eval and from_pretrained."""
    ckpt = r.ckpt_copy("garbled")
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "moecompress.json").read_text())
    canonical = json.dumps(config["quantization_config"], sort_keys=True, separators=(",", ":"))
    manifest["config"]["quantization_config_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (ckpt / "moecompress.json").write_text(json.dumps(manifest))
    run = r.cli("eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1")
    loaded = r.python(
        "import sys, moecompress\nfrom moecompress.errors import CheckpointError\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept CheckpointError as e:\n"
        "    print('error:', e, file=sys.stderr); sys.exit(2)",
        ckpt,
    )
    ok = run.one_error_line() and loaded.rc == 2
    return ok, f"eval: {run.last[:110]} | from_pretrained rc {loaded.rc}: {loaded.last[-60:]}"


def stripped(r: Replay) -> tuple[bool, str]:
    ckpt = r.ckpt_copy("stripped")
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    run = r.python(
        "import sys\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(sys.argv[1])",
        ckpt,
    )
    return run.rc != 0, "plain transformers: " + ("refused: " + run.last[:100] if run.rc else "LOADED (random experts)")


def damaged_source(r: Replay, harm, stream: bool) -> tuple[bool, str]:
    source = r.source_copy("source")
    from safetensors.torch import load_file, save_file

    state, config = load_file(source / "model.safetensors"), json.loads((source / "config.json").read_text())
    harm(state, config)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps(config))
    out = r.fresh("o")
    run = r.compress(source, out, *([] if stream else ["--no-stream"]))
    ok = run.one_error_line() and not out.exists() and not Path(str(out) + ".compress-state").exists()
    return ok, f"rc {run.rc}: {run.last[:140]}"


def int_weight(state, config):
    import torch

    state["model.layers.1.self_attn.q_proj.weight"] = (state["model.layers.1.self_attn.q_proj.weight"] * 100).to(
        torch.int32
    )


def untied(state, config):
    config["tie_word_embeddings"] = False


def inf_in(key: str):
    def harm(state, config):
        if key == "lm_head.weight":
            config["tie_word_embeddings"] = False
            state[key] = state["model.embed_tokens.weight"].clone()
        state[key][5, 3] = float("inf")

    return harm


def symlinked_recipe(r: Replay) -> tuple[bool, str]:
    ckpt = r.ckpt_copy("linked")
    secret = r.work / "private.yaml"
    secret.write_text("token: hf_secret_value\n")
    (ckpt / "recipe.yaml").unlink()
    (ckpt / "recipe.yaml").symlink_to(secret)
    out = r.fresh("hub")
    run = r.cli("export", ckpt, "--hub", "me/x", "--base-model", "org/tiny", "--dry-run", "-o", out)
    leaked = out.exists() and any(
        "hf_secret_value" in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file()
    )
    return run.one_error_line() and not leaked, (
        "PUBLISHED the link target; " if leaked else ""
    ) + f"rc {run.rc}: {run.last[:120]}"


def threaded_loads(r: Replay) -> tuple[bool, str]:
    code = textwrap.dedent("""
        import sys, threading, moecompress
        errors = []
        def load():
            try:
                moecompress.load(sys.argv[1])
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        threads = [threading.Thread(target=load) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(f"{8 - len(errors)} of 8 loaded" + (f"; {errors[0][:90]}" if errors else ""), file=sys.stderr)
        sys.exit(1 if errors else 0)
    """)
    run = r.python(code, r.ckpt)
    return run.rc == 0, run.last


def concurrent_records(r: Replay) -> tuple[bool, str]:
    record = r.fresh("records") / "run.json"
    record.parent.mkdir()
    code = textwrap.dedent("""
        import sys, time
        from moecompress.evaluation.records import add_evaluation
        time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all four start together, imports done
        for i in range(50):
            add_evaluation(sys.argv[1], "ppl", {f"data-{sys.argv[2]}-{i}": {"ppl": 1.0}})
    """)
    r.python(
        "import sys\nfrom moecompress.evaluation.records import RunRecord, add_evaluation\n"
        "add_evaluation(sys.argv[1], 'ppl', {}, RunRecord(name='m', model='m'))",
        record,
    )
    env = r.env
    start = str(time.time() + 20)
    children = [
        subprocess.Popen([sys.executable, "-c", code, str(record), str(w), start], env=env, cwd=r.tree)
        for w in range(4)
    ]
    for child in children:
        child.wait()
    kept = len(json.loads(record.read_text())["evaluations"]["ppl"])
    return kept == 200, f"{kept} of 200 results kept (4 processes x 50, started together)"


def tokenizer_case(r: Replay, foreign: bool) -> tuple[bool, str]:
    source = r.fresh("notok")
    shutil.copytree(TINY, source, ignore=shutil.ignore_patterns("tokenizer*"))
    if foreign:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(["a", "b", "c", "d", "[UNK]"])}
        tok = Tokenizer(models.WordLevel(vocab, "[UNK]"))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(source)
    run = r.compress(source, r.fresh("o"))
    return run.one_error_line() and "tokenizer" in run.last, f"rc {run.rc}: {run.last[:140]}"


def ctrl_c_at_start(r: Replay) -> tuple[bool, str]:
    entry = "_moecompress_cli" if (r.tree / "_moecompress_cli.py").is_file() else "moecompress.cli"
    code = f"import sys; from {entry} import main; sys.exit(main())"
    child = subprocess.Popen(
        [sys.executable, "-c", code, "compress", str(TINY), "-o", str(r.fresh("o"))],
        env=r.env,
        cwd=r.tree,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    run = Run(child.wait(), child.stderr.read())
    return run.one_error_line(130), f"rc {run.rc}: {run.last[:120]}"


def failed_run_keeps_state(r: Replay) -> tuple[bool, str]:
    source = r.source_copy("nan")
    from safetensors.torch import load_file, save_file

    state = load_file(source / "model.safetensors")
    state["model.layers.0.mlp.experts.3.up_proj.weight"][7, 11] = float("nan")  # no layer done, the plan kept
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    out = r.fresh("o")
    shutil.rmtree(Path(str(out) + ".compress-state"), ignore_errors=True)
    run = r.compress(source, out)
    said = "compress-state" in run.err
    return run.one_error_line() and said, ("says " if said else "SILENT about ") + f"o.compress-state; {run.last[:100]}"


def one_tensor_above_ulimit(r: Replay) -> tuple[bool, str]:
    code = textwrap.dedent("""
        import resource, signal, sys
        from moecompress.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, resource.RLIM_INFINITY))
        sys.exit(main(sys.argv[1:]))
    """)
    run = r.python(code, "compress", TINY, "--recipe", r.recipe, "-o", r.fresh("o"), "--max-shard-size", "1MB")
    named = "embed_tokens" in run.last
    return run.one_error_line() and named, f"rc {run.rc}: {run.last[:150]}"


def long_output(r: Replay) -> tuple[bool, str]:
    run = r.compress(TINY, r.work / ("a" * 250))
    return run.one_error_line() and "free space" not in run.last.lower(), f"rc {run.rc}: {run.last[:130]}"


def duplicate_shard_tensor(r: Replay) -> tuple[bool, str]:
    from safetensors.torch import load_file, save_file

    source = r.fresh("dup")
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY / name, source / name)
    state = load_file(TINY / "model.safetensors")
    keys = sorted(state)
    half = {k: state[k] for k in keys[: len(keys) // 2]}
    rest = {k: state[k] for k in keys[len(keys) // 2 :]}
    rest[keys[0]] = state[keys[0]]  # the same tensor in both shards
    save_file(half, source / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(rest, source / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in half} | {
        k: "model-00002-of-00002.safetensors" for k in rest if k not in half
    }
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    run = r.compress(source, r.fresh("o"))
    return run.one_error_line() and "twice" in run.last, f"rc {run.rc}: {run.last[:140]}"


def json_eval_file(r: Replay) -> tuple[bool, str]:
    texts = [json.loads(line)["text"] for line in CALIB.read_text().splitlines()[:40] if line.strip()]
    lines = [json.dumps({"text": t}) for t in texts]
    (r.work / "e.jsonl").write_text("\n".join(lines))
    (r.work / "e.JSONL").write_text("\n".join(lines))
    (r.work / "e.json").write_text("[" + ",".join(lines) + "]")
    values = {}
    for name in ("e.jsonl", "e.JSONL", "e.json"):
        run = r.python(
            "import sys, json\nfrom moecompress.cli import main\nsys.exit(main(sys.argv[1:]))",
            "eval",
            "ppl",
            r.ckpt,
            "--data",
            r.work / name,
            "--max-windows",
            "2",
            "--no-record",
            "--json",
            r.work / f"{name}.out",
        )
        out = r.work / f"{name}.out"
        values[name] = (
            round(next(iter(json.loads(out.read_text())["result"].values()))["ppl"], 4)
            if run.rc == 0
            else f"rc {run.rc}"
        )
    same = len(set(values.values())) == 1
    return same, ", ".join(f"{k} {v}" for k, v in values.items())


def seq_len_above_max(r: Replay) -> tuple[bool, str]:
    run = r.cli("eval", "ppl", r.ckpt, "--data", WIKI, "--seq-len", "4096", "--max-windows", "1", "--no-record")
    return run.one_error_line(), f"rc {run.rc}: {run.last[:130]}"


def manifest_without_format(r: Replay) -> tuple[bool, str]:
    ckpt = r.ckpt_copy("noformat")
    manifest = json.loads((ckpt / "moecompress.json").read_text())
    del manifest["format"]
    (ckpt / "moecompress.json").write_text(json.dumps(manifest))
    run = r.cli("eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1")
    return run.one_error_line() and "upgrade" not in run.last, f"rc {run.rc}: {run.last[:130]}"


BIG_LAYER = """
import json, shutil, sys, torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
tiny = json.loads(open(sys.argv[2] + "/config.json").read())
config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, intermediate_size=4096, num_experts=128,
    num_experts_per_tok=8, num_hidden_layers=2, vocab_size=tiny["vocab_size"], num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, tie_word_embeddings=True)
torch.manual_seed(0)
Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{sys.argv[2]}/{name}", sys.argv[1])
"""


def ctrl_c_in_a_big_layer(r: Replay) -> tuple[bool, str]:
    """128 experts of 2048 x 768 (random weights), GPTQ w4: SIGINT 150 s in, while the first layer is worked on."""
    model = r.work / "big"
    if not model.exists():
        made = r.python(BIG_LAYER, model, TINY)
        assert made.rc == 0, made.err[-1000:]
    entry = "_moecompress_cli" if (r.tree / "_moecompress_cli.py").is_file() else "moecompress.cli"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import sys; from {entry} import main; sys.exit(main())", "compress", str(model)]
        + ["-o", str(r.fresh("big-out")), "--calib", str(CALIB), "--num-samples", "4"],
        env=r.env,
        cwd=r.tree,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(150)
    sent = time.perf_counter()
    child.send_signal(signal.SIGINT)
    run = Run(child.wait(), child.stderr.read())
    waited = time.perf_counter() - sent
    return run.one_error_line(130) and waited < 30, f"stopped {waited:.1f} s after SIGINT, rc {run.rc}: {run.last[:80]}"


CASES = [
    (
        "high",
        "resume: flipped byte in a stored layer",
        lambda r: resumed(r, lambda s: flip(s / "layer-00000.safetensors")),
    ),
    ("high", "config.json without quantization_config", stripped),
    (
        "medium",
        "resume: truncated layer file",
        lambda r: resumed(r, lambda s: os.truncate(s / "layer-00001.safetensors", 1000)),
    ),
    (
        "medium",
        "resume: layer file replaced by another's",
        lambda r: resumed(r, lambda s: shutil.copyfile(s / "layer-00001.safetensors", s / "layer-00000.safetensors")),
    ),
    (
        "medium",
        "quantization_config: format index out of range",
        lambda r: refused_everywhere(r, lambda qc: qc["experts"][next(iter(qc["experts"]))][0].__setitem__(0, 99)),
    ),
    ("medium", "quantization_config: formats []", lambda r: refused_everywhere(r, lambda qc: qc.update(formats=[]))),
    (
        "medium",
        "quantization_config: module that does not exist",
        lambda r: refused_everywhere(
            r,
            lambda qc: qc["experts"].update(
                {"model.layers.9.mlp.experts": qc["experts"].pop(next(iter(qc["experts"])))}
            ),
        ),
    ),
    ("medium", "source: integer weight (streamed)", lambda r: damaged_source(r, int_weight, True)),
    ("medium", "source: integer weight (in memory)", lambda r: damaged_source(r, int_weight, False)),
    ("medium", "source: untied, no lm_head.weight (streamed)", lambda r: damaged_source(r, untied, True)),
    ("medium", "source: untied, no lm_head.weight (in memory)", lambda r: damaged_source(r, untied, False)),
    (
        "medium",
        "source: num_experts_per_tok > num_experts",
        lambda r: damaged_source(r, lambda s, c: c.update(num_experts_per_tok=c["num_experts"] + 1), True),
    ),
    (
        "medium",
        "source: +Inf in the embeddings",
        lambda r: damaged_source(r, inf_in("model.embed_tokens.weight"), True),
    ),
    ("medium", "source: +Inf in the LM head", lambda r: damaged_source(r, inf_in("lm_head.weight"), True)),
    ("medium", "export: recipe.yaml linked from outside", symlinked_recipe),
    ("medium", "8 threads calling moecompress.load", threaded_loads),
    ("low", "4 processes adding to one run.json at once", concurrent_records),
    ("low", "folder without tokenizer files", lambda r: tokenizer_case(r, False)),
    ("low", "tokenizer of 5 words for 8192 ids", lambda r: tokenizer_case(r, True)),
    ("low", "Ctrl-C during start-up", ctrl_c_at_start),
    ("low", "failed run keeps OUT.compress-state", failed_run_keeps_state),
    ("low", "one tensor above ulimit -f", one_tensor_above_ulimit),
    ("low", "250-character output name", long_output),
    ("low", "one tensor in two source shards", duplicate_shard_tensor),
    ("low", ".json / .JSONL evaluation files", json_eval_file),
    ("low", "--seq-len above the model's maximum", seq_len_above_max),
    ("low", "manifest without format", manifest_without_format),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, default=Path("."), help="source tree whose moecompress is replayed")
    p.add_argument("-k", help="only cases whose description contains this")
    p.add_argument("--big", action="store_true", help="also Ctrl-C in a 128-expert layer (builds a 2.5 GB model)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="moecompress-faults-") as tmp:
        replay = Replay(args.tree, Path(tmp))
        good = 0
        cases = CASES + ([("low", "Ctrl-C in a layer of 128 experts", ctrl_c_in_a_big_layer)] if args.big else [])
        cases = [c for c in cases if not args.k or args.k in c[1]]
        print(f"{'severity':8} {'case':48} {'result':6} what happened")
        for severity, what, case in cases:
            try:
                ok, detail = case(replay)
            except Exception as exc:  # noqa: BLE001 - a case that cannot even be set up is reported, not fatal
                ok, detail = False, f"replay failed: {type(exc).__name__}: {str(exc)[:120]}"
            good += ok
            print(f"{severity:8} {what:48} {'ok' if ok else 'FAIL':6} {detail}", flush=True)
        print(f"{good} of {len(cases)} cases as a user needs them ({args.tree})")


if __name__ == "__main__":
    main()
