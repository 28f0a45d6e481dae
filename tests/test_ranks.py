"""Expert-parallel ranks on torch.distributed (gloo, on this machine's CPU): each rank works on its share of every
layer's experts and rank 0 writes; the tensors written are bit for bit one rank's (at the same threads per process:
BLAS sums in another order with more threads); a killed rank ends the job with one line and a rerun resumes."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moecompress
from moecompress.cli import main
from moecompress.distributed import Ranks, failed_rank
from moecompress.errors import RecipeError
from moecompress.recipe import Recipe

from .conftest import REPO
from .test_streaming import tensor_hashes

PIPELINES = REPO / "pipelines"


def small(name: str, recovery: bool = True) -> Recipe:
    """A shipped recipe on 8 calibration windows (without its recovery training unless `recovery`)."""
    recipe = Recipe.from_yaml(PIPELINES / f"{name}.yaml")
    recipe.calibration.num_samples = 8
    recipe.recovery.enabled = recipe.recovery.enabled and recovery
    return recipe


def one_rank(source, recipe: Recipe, output):
    """The reference: one process at one thread, as each of two ranks runs on two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moecompress.compress(str(source), recipe, output, progress=False)
    finally:
        torch.set_num_threads(threads)
    return tensor_hashes(output)


def ranks_cli(source, recipe_file, output, *extra, ranks: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moecompress", "compress", str(source), "--recipe", str(recipe_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, "-o", str(output), "--ranks", str(ranks), *extra], capture_output=True, text=True, env=env
    )


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_shares_cover_the_experts_once_and_differ_by_one_at_most():
    for count in (2, 7, 16, 257):
        for size in range(1, min(count, 9) + 1):
            shares = [Ranks(r, size).share(count) for r in range(size)]
            assert [e for s in shares for e in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_launcher_names_the_rank_that_failed_not_the_ones_it_stopped():
    assert failed_rank([0, 0]) is None
    assert failed_rank([3, -signal.SIGKILL]) == 1  # rank 0 lost its peer, rank 1 was killed
    assert failed_rank([2, 143]) == 0  # rank 0 refused the job, rank 1 was stopped


def test_more_ranks_than_experts_are_refused_before_anything_is_written(tiny_text_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="17 ranks for decoder layer 0's 16 routed experts.*at most 16 ranks"):
        moecompress.compress(str(tiny_text_path), small("gptq-w4g128"), out, progress=False, ranks=Ranks(0, 17))
    assert sorted(tmp_path.iterdir()) == []


def test_a_whole_model_stage_is_refused_on_several_ranks(tiny_text_path, tmp_path):
    with pytest.raises(RecipeError, match="stages recovery run on one rank"):
        moecompress.compress(str(tiny_text_path), small("ternary-experts"), tmp_path / "o", ranks=Ranks(0, 2))
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "backend, message",
    [("nccl", "no nccl backend for torch.distributed"), ("carrier-pigeon", "--backend carrier-pigeon: use one of")],
)
def test_a_missing_backend_is_one_line_before_any_rank_starts(backend, message, tiny_text_path, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_text_path), "-o", str(out), "--ranks", "2", "--backend", backend])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


def test_an_output_rank_0_refuses_ends_every_rank_in_its_one_line(tiny_text_path, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    done = ranks_cli(tiny_text_path, PIPELINES / "gptq-w4g128.yaml", tmp_path / "taken")
    assert done.returncode == 2 and len(errors(done.stderr)) == 1 and "taken" in errors(done.stderr)[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_two_gloo_ranks_write_one_rank_s_tensors(tiny_text_path, tmp_path):
    recipe = small("gptq-w4g128")
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    done = ranks_cli(tiny_text_path, tmp_path / "r.yaml", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert tensor_hashes(tmp_path / "two") == one_rank(tiny_text_path, recipe, tmp_path / "one")
    moecompress.load(tmp_path / "two")  # checks every tensor against the manifest rank 0 wrote


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mc-2.5bit", "ternary-experts", "factored-2bit"])
def test_two_gloo_ranks_write_one_rank_s_tensors_for_every_layer_wise_method(name, tiny_text_path, tmp_path):
    recipe = small(name, recovery=False)  # (ternary-experts' recovery training runs on one rank)
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    done = ranks_cli(tiny_text_path, tmp_path / "r.yaml", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert tensor_hashes(tmp_path / "two") == one_rank(tiny_text_path, recipe, tmp_path / "one")


def _rank_pid(parent: int, rank: int) -> int | None:
    """The process `parent` started as rank `rank` (RANK=rank in its environment)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/environ", "rb") as environ:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                if ppid == parent and f"RANK={rank}".encode() in environ.read().split(b"\0"):
                    return pid
        except (OSError, ValueError):
            continue
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_layer_ends_the_job_in_one_line_and_the_rerun_resumes(tiny_text_path, tmp_path):
    recipe = small("gptq-w4g128")
    recipe.calibration.num_samples = 32  # layers of ~1.5 s: rank 1 is killed inside layer 1
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    out, state = tmp_path / "two", tmp_path / "two.compress-state"
    cmd = [sys.executable, "-m", "moecompress", "compress", str(tiny_text_path), "--recipe", str(tmp_path / "r.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*cmd, "-o", str(out), "--ranks", "2"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (state / "layer-00000.json").exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
    stderr = job.communicate()[1]
    assert job.returncode == 1
    assert errors(stderr) == [
        f"error: rank 1 was killed by signal SIGKILL; the finished layers are kept in {state}: rerun the same "
        "command to resume."
    ]
    assert not out.exists() and (state / "layer-00000.json").exists() and not (state / "layer-00003.json").exists()
    done = ranks_cli(tiny_text_path, tmp_path / "r.yaml", out)
    assert done.returncode == 0 and "resuming after layer" in done.stderr, done.stderr[-3000:]
    assert tensor_hashes(out) == one_rank(tiny_text_path, recipe, tmp_path / "one")
    assert not state.exists()
