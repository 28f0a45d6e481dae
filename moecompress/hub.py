"""`moecompress export`: a Hub-ready folder (weights, config, tokenizer/processor, recipe, run record and a
generated model card) in the moecompress, compressed-tensors or GPTQ layout, uploaded with huggingface_hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .errors import CheckpointError, HubError
from .evaluation.efficiency import checkpoint_bytes
from .evaluation.records import RUN_RECORD, RunRecord, read_record
from .io.checkpoint import MANIFEST, copy_aux_files, inside, verify_checkpoint
from .io.interop import EXPORT_FORMATS, uniform_format, write_interop_files
from .report import markdown_table, metrics, recovery
from .storage.outputs import atomic_folder

FORMATS = ("moecompress", *EXPORT_FORMATS)


def engines(fmt_name: str, config: dict) -> list[str]:
    """Who can run a checkpoint in this layout (what was verified is said so)."""
    if fmt_name == "compressed-tensors":
        sym = config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"]
        return [
            "transformers + compressed-tensors (`AutoModelForCausalLM.from_pretrained`; experts are dequantized at load"
            + (")" if sym else "; asymmetric MoE experts need huggingface/transformers#47430)"),
            "vLLM and SGLang (compressed-tensors WNA16 MoE kernels)",
        ]
    if fmt_name == "gptq":
        return [
            "GPTQModel (`GPTQModel.load`, checked with 7.7.0 on CPU)",
            "vLLM and SGLang GPTQ MoE kernels (GPTQ v1 layout)",
        ]
    qc = config.get("quantization_config", {})
    try:
        uniform_format(config)
        portable = "; `moecompress export --format compressed-tensors|gptq` converts it for other engines"
    except CheckpointError:
        portable = ""
    special = [k for k in ("expert_maps", "dynamic_skip") if qc.get(k)]
    return [
        f"moecompress only (`moecompress.load`, or `AutoModelForCausalLM.from_pretrained` after `import moecompress`)"
        f"{portable}" + (f"; uses {', '.join(special)}" if special else "")
    ]


def _load_snippet(fmt_name: str, repo_id: str, multimodal: bool) -> str:
    auto = "AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM"
    if fmt_name == "moecompress":
        return (
            f"```python\nimport moecompress\nfrom huggingface_hub import snapshot_download\n\n"
            f'model = moecompress.load(snapshot_download("{repo_id}"))\n```'
        )
    if fmt_name == "gptq":
        return f'```python\nfrom gptqmodel import GPTQModel\n\nmodel = GPTQModel.load("{repo_id}")\n```'
    return (
        f"```python\n# pip install compressed-tensors\nfrom transformers import {auto}\n\n"
        f'model = {auto}.from_pretrained("{repo_id}")\n```'
    )


def evaluation_rows(record: RunRecord, base: RunRecord | None) -> tuple[list[str], list[list[str]]]:
    ours, ref = metrics(record), metrics(base) if base else {}
    header = ["metric", "this model", *([f"{base.name} (base)", "recovery %"] if base else [])]
    rows = []
    for key, m in ours.items():
        digits = 2 if key.startswith("ppl") else 4
        row = [m.label + (" (lower is better)" if not m.higher_is_better else ""), f"{m.value:.{digits}f}"]
        if base:
            row += [f"{ref[key].value:.{digits}f}", f"{recovery(ref[key], m):.1f}"] if key in ref else ["", ""]
        rows.append(row)
    return header, rows


def model_card(
    record: RunRecord,
    config: dict,
    fmt_name: str,
    repo_id: str,
    base_model: str,
    base: RunRecord | None,
    recipe_yaml: str,
    weight_bytes: int,
) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    multimodal = "vision_config" in config
    qc = config.get("quantization_config", {})
    formats = qc.get("formats", [])
    tags = [
        "moecompress",
        "mixture-of-experts",
        "quantized",
        *([fmt_name] if fmt_name != "moecompress" else []),
        *(["mixed-precision"] if len(formats) > 1 else []),
        *(["ternary"] if any(f.get("ternary") for f in formats) else []),
    ]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized",
        tags=tags,
        library_name={"moecompress": "moecompress", "compressed-tensors": "transformers", "gptq": "gptqmodel"}[
            fmt_name
        ],
        pipeline_tag="image-text-to-text" if multimodal else "text-generation",
    )
    c = record.compression
    facts = [
        ["method", record.method],
        ["recipe", f"`{record.recipe}`"],
        ["checkpoint format", fmt_name],
        [
            "routed-expert bits per parameter (codes + scales + zeros, moecompress layout)",
            f"{record.expert_bits_per_param:.3f}" if record.expert_bits_per_param else "",
        ],
        ["routed-expert bytes", f"{c.get('expert_bytes', 0) / 1e6:.2f} MB"],
        ["expert parameters", f"{c.get('expert_params', 0):,}"],
        ["calibration tokens", f"{c.get('calibration_tokens', 0):,}"],
        [
            "kept in source precision",
            "attention, routers, shared experts, embeddings, norms" + (", vision tower" if multimodal else ""),
        ],
        ["weight files of this repository", f"{weight_bytes / 1e6:.2f} MB"],
    ]
    efficiency = record.evaluations.get("efficiency")
    if efficiency:
        facts.append(["active parameters per token", f"{efficiency['active_params_per_token'] / 1e6:.2f} M"])
    header, rows = evaluation_rows(record, base)
    evaluation = (
        (
            markdown_table(header, rows) + "\n\nRecovery % = this model / base for accuracies, base / this model for "
            "perplexity (100 % = no loss)."
        )
        if rows
        else "No evaluation recorded: run `moecompress eval` on the checkpoint before exporting."
    )
    body = f"""
# {repo_id.split("/")[-1]}

`{base_model}` with its routed experts compressed by moecompress: {record.method}.

## Compression
{markdown_table(["", ""], facts)}

## Evaluation
{evaluation}

## How to load
{_load_snippet(fmt_name, repo_id, multimodal)}

## Engines that can load this checkpoint
{chr(10).join(f"- {e}" for e in engines(fmt_name, config))}

## Recipe
<details><summary>recipe.yaml</summary>

```yaml
{recipe_yaml.strip()}
```
</details>
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _is_hub_id(name: str | None) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def prepare_hub_folder(
    checkpoint: str | Path,
    output: str | Path,
    repo_id: str,
    fmt_name: str = "moecompress",
    base_model: str | None = None,
    base: RunRecord | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the folder that `upload_folder` sends: weights in `fmt_name`, config, processor files, recipe,
    run record and README.md (the model card). Only the files the format defines are copied (no dotfiles, no
    links leading out of the checkpoint), and local paths in the metadata become hub ids or file names.
    Written atomically."""
    if fmt_name not in FORMATS:
        raise CheckpointError(f"unknown format '{fmt_name}'; use one of {FORMATS}.")
    source = Path(checkpoint).expanduser()
    manifest = verify_checkpoint(source, check_hashes=False)  # fail fast; hashes are checked when the weights are read
    record = read_record(source)
    base_model = base_model or record.base_model
    if not _is_hub_id(base_model):
        raise CheckpointError(
            f"the card's base_model must be a Hub id, but the source is '{base_model}' (a local path?): "
            "pass --base-model OWNER/NAME (the id the source model is published under)."
        )
    public = {
        str(source.resolve()): repo_id,
        record.model: repo_id,
        **{s: base_model for s in (record.base_model, manifest.get("source_model")) if s},
    }
    outside = next((n for n in checkpoint_files(source, manifest) if not inside(source, source / n)), None)
    if outside is not None:
        raise CheckpointError(
            f"{source / outside} is a link to {(source / outside).resolve()}, outside the checkpoint folder; an "
            "export publishes only the checkpoint's own files: replace the link with the file itself."
        )
    with atomic_folder(output, [checkpoint], overwrite, kind="export") as tmp:
        if fmt_name == "moecompress":
            verify_checkpoint(source)
            for name in checkpoint_files(source, manifest):
                shutil.copyfile(source / name, tmp / name)
            copy_aux_files(str(source), tmp)
        else:
            write_interop_files(source, tmp, fmt_name)
        for name in (RUN_RECORD, MANIFEST, "moecompress_export.json", "plan.json"):
            if (tmp / name).is_file():
                (tmp / name).write_text(json.dumps(portable(json.loads((tmp / name).read_text()), public), indent=1))
        recipe = (
            yaml.safe_dump(portable(yaml.safe_load((source / "recipe.yaml").read_text()), public), sort_keys=False)
            if (source / "recipe.yaml").is_file()
            else ""
        )
        if recipe:
            (tmp / "recipe.yaml").write_text(recipe)
        config = json.loads((tmp / "config.json").read_text())
        card = model_card(record, config, fmt_name, repo_id, base_model, base, recipe, checkpoint_bytes(tmp))
        (tmp / "README.md").write_text(card)
    return Path(output).expanduser().resolve()


def checkpoint_files(folder: Path, manifest: dict) -> list[str]:
    """The files moecompress writes into a checkpoint (tokenizer/processor files are `copy_aux_files`'s)."""
    names = {
        *manifest["files"],
        MANIFEST,
        "config.json",
        "model.safetensors.index.json",
        "recipe.yaml",
        RUN_RECORD,
        "plan.json",
    }
    return sorted(n for n in names if (folder / n).is_file())


def portable(value, public: dict[str, str]):
    """`value` (parsed JSON/YAML) with local paths replaced: known ones by their hub id, other absolute
    paths by their file name, so nothing published names a folder of this machine."""
    if isinstance(value, dict):
        return {k: portable(v, public) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, public) for v in value]
    if isinstance(value, str):
        if value in public:
            return public[value]
        if value.startswith(("/", "~")):
            resolved = str(Path(value).expanduser().resolve())
            return public.get(resolved, Path(value).name)
    return value


def upload(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    api=None,
) -> str:
    """create_repo (exist_ok) + upload_folder; returns the commit URL. `api`: an `HfApi` to use instead."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (
        (folder / MANIFEST).is_file() or (folder / "config.json").is_file()
    ):
        raise CheckpointError(f"{folder} is not an export folder; create it with `moecompress export` first.")
    api = api or HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=[".*"],
            commit_message=f"Upload {folder.name} (moecompress export)",
        )
    except Exception as exc:  # HTTP status, network and auth errors of huggingface_hub's client alike
        raise HubError(
            f"uploading {folder} to '{repo_id}' failed: {exc}. The folder is complete; check the token "
            "(`hf auth login` or --token) and the network, then re-run the same export command."
        ) from exc
    return commit.commit_url
