"""A layer's experts a chunk at a time under a memory budget: the plan, its refusals, and output tensors bit for bit
those of the whole-layer engine."""

import json
import shutil

import pytest
import torch

import moecompress
from moecompress.calibration.budget import LayerCost, parse_size, plan_memory
from moecompress.cli import main
from moecompress.errors import InsufficientMemoryError
from moecompress.models.loading import LargeOnMeta
from moecompress.recipe import Recipe

from .test_streaming import killed_run, recipe, tensor_hashes

GB = 10**9


def _chunked(name: str, size: int):
    r = recipe(name)
    r.calibration.experts_per_chunk = size
    return r


@pytest.mark.parametrize("name", ["gptq-w4", "lp-2.5", "rtn-ternary"])
def test_chunked_layers_write_exactly_the_whole_layer_tensors(name, tiny_text_path, tmp_path):
    whole = moecompress.compress(str(tiny_text_path), recipe(name), tmp_path / "whole", progress=False)
    chunked = moecompress.compress(str(tiny_text_path), _chunked(name, 5), tmp_path / "chunked", progress=False)
    assert whole.report.memory["chunks"] == [16] * 4  # moe-tiny-text: 4 layers of 16 experts, whole by default
    assert chunked.report.memory["chunks"] == [5] * 4  # 16 experts: chunks of 5, 5, 5 and 1
    assert tensor_hashes(tmp_path / "chunked") == tensor_hashes(tmp_path / "whole")


def _cost(experts=8, expert=GB // 10, statistics=GB // 100):
    return LayerCost(
        experts, fixed=GB, outside=GB // 2, expert=expert, statistics=statistics, working=GB // 5, chunked=0
    )


def test_the_plan_chunks_only_the_layers_that_do_not_fit():
    costs = [_cost(), _cost(experts=0), _cost(experts=32)]
    plan = plan_memory(costs, outside=GB, budget=3 * GB, fixed_chunk=None, cannot_chunk=lambda i: None)
    assert plan.chunks == [8, None, 11]  # 1.7 GB + 8 x 0.11 GB fits; 32 experts do not: (3 - 1.7) // 0.11 = 11
    assert plan.chunk(0) is None and plan.chunk(2) == 11 and plan.chunked
    assert max(plan.peaks) <= 3 * GB
    assert "layer 2: 3 chunks of 11 experts" in plan.describe()


def test_a_budget_too_small_is_refused_naming_the_smallest_that_works():
    with pytest.raises(InsufficientMemoryError, match=r"the smallest --max-memory that works is 1.81 GB"):
        plan_memory([_cost()], outside=GB, budget=int(1.75 * GB), fixed_chunk=None, cannot_chunk=lambda i: None)
    with pytest.raises(InsufficientMemoryError, match=r"works on whole layers; raise .* to 2.58 GB or more"):
        plan_memory([_cost()], GB, 2 * GB, None, cannot_chunk=lambda i: "stage x works on whole layers")
    with pytest.raises(InsufficientMemoryError, match=r"embeddings, head and calibration activations alone"):
        plan_memory([_cost()], outside=3 * GB, budget=2 * GB, fixed_chunk=None, cannot_chunk=lambda i: None)


def test_sizes_are_parsed_in_decimal_and_binary_units():
    assert parse_size("6GB") == 6 * GB and parse_size("2GiB") == 2 * 2**30 and parse_size(" 500 mb ") == 5 * 10**8
    for bad in ("six GB", "6 parsecs", "0GB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_a_run_that_cannot_fit_stops_before_writing_anything(capsys, tiny_text_path, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_text_path), "-o", str(out), "--max-memory", "10MB", "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "over the memory budget of 0.01 GB" in err and "raise calibration.max_memory" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor a state folder


@pytest.mark.parametrize(
    ("line", "problem"),
    [("max_memory: 6 parsecs", "calibration.max_memory"), ("experts_per_chunk: 0", "experts_per_chunk 0")],
)
def test_a_bad_budget_in_the_recipe_is_refused(line, problem, capsys, tiny_text_path, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"calibration:\n  {line}\n")
    assert main(["compress", str(tiny_text_path), "--recipe", str(path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_meta_skeleton_never_allocates_a_large_parameter_first():
    with LargeOnMeta(limit=5000):  # DeepSeek-V3's fused gate_up (30 GB in float32) would not allocate on 24 GB
        assert torch.nn.Parameter(torch.empty(32, 32)).device.type == "cpu"
        assert torch.empty(64, 64).device.type == "meta" and torch.empty((3000,), dtype=torch.bfloat16).is_meta
        assert torch.zeros(64, 64, device="cpu").device.type == "cpu"  # a device given is kept


def test_a_killed_chunked_run_resumes_and_checks_every_part(tiny_text_path, tmp_path, caplog):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(_chunked("gptq-w4", 5).to_yaml())
    out, state = tmp_path / "o", tmp_path / "o.compress-state"
    killed_run(tiny_text_path, out, recipe_file, "after", layer=1)
    parts = [f"part-00001-{first:05d}.safetensors" for first in (0, 5, 10, 15)]
    assert json.loads((state / "layer-00001.json").read_text())["parts"] == parts
    shutil.copytree(state, tmp_path / "damaged.compress-state")
    moecompress.compress(str(tiny_text_path), Recipe.from_yaml(recipe_file), out, progress=False)
    whole = tensor_hashes(out)
    moecompress.compress(str(tiny_text_path), recipe("gptq-w4"), tmp_path / "whole", progress=False)
    assert whole == tensor_hashes(tmp_path / "whole")

    part = tmp_path / "damaged.compress-state" / parts[2]
    part.write_bytes(part.read_bytes()[:-1] + bytes([part.read_bytes()[-1] ^ 1]))
    moecompress.compress(str(tiny_text_path), Recipe.from_yaml(recipe_file), tmp_path / "damaged", progress=False)
    assert f"{parts[2]} is missing or changed" in caplog.text and "starts over" in caplog.text
    assert tensor_hashes(tmp_path / "damaged") == whole
