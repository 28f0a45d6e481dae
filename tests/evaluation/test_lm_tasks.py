import importlib.util

import datasets
import pytest

from moecompress.errors import CalibrationDataError
from moecompress.evaluation.lm_tasks import DEFAULT_INCLUDE_PATH, _metrics, lm_eval_tasks

from ..conftest import SHARED, require_shared

spec = importlib.util.spec_from_file_location("task_utils", DEFAULT_INCLUDE_PATH / "utils.py")
task_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_utils)


def test_items_have_four_distinct_choices_and_the_true_continuation_at_label():
    lines = [" ".join(f"w{i}_{j}" for j in range(90)) for i in range(20)] + ["= heading =", "short line"]
    items = task_utils.wiki_pairs(datasets.Dataset.from_dict({"text": lines}))
    assert len(items) == 20
    for i, item in enumerate(items):
        assert len(set(item["choices"])) == 4
        truth = item["choices"][item["label"]]
        assert truth.split()[0] == f"w{i}_60" and item["context"].split()[-1] == f"w{i}_59"
    assert sorted({item["label"] for item in items}) == [0, 1, 2, 3]


def test_lm_eval_result_keys_become_plain_metric_names():
    raw = {
        "alias": "moe_code_mc",
        "acc,none": 0.5,
        "acc_stderr,none": 0.1,
        "acc_norm,none": float("nan"),
        "sample_len,none": 40,
        "exact_match,strict": 0.25,
    }
    assert _metrics(raw) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict": 0.25}


@pytest.mark.slow  # lm-eval indexes its whole task registry (~15 s)
def test_unknown_task_names_fail_with_a_hint(monkeypatch):
    class Stub:
        def parameters(self):
            raise AssertionError("the model must not run")

    with pytest.raises(CalibrationDataError, match="lm-eval ls tasks"):
        lm_eval_tasks(Stub(), None, ["no_such_task_xyz"])


@pytest.mark.slow
def test_offline_code_task_on_the_reference_model_beats_chance(tiny_text_path, monkeypatch):
    from transformers import AutoTokenizer

    from moecompress.models import load_model

    require_shared(SHARED / "data" / "heldout-text")
    monkeypatch.chdir(DEFAULT_INCLUDE_PATH.parents[1])  # the task files name ../shared relative to the repo root
    model = load_model(str(tiny_text_path)).model
    results = lm_eval_tasks(model, AutoTokenizer.from_pretrained(tiny_text_path), ["moe_code_mc"], limit=40)
    assert results["moe_code_mc"]["acc"] >= 0.45  # chance is 0.25; the model scores ~0.66 on 100 items
    assert 0 < results["moe_code_mc"]["acc_stderr"] < 0.1
