import json

import pytest

from moecompress.errors import CalibrationDataError
from moecompress.evaluation.vlqa import accepted_answers, vl_qa_accuracy

from ..conftest import SHAPES, require_shared


def test_generic_items_accept_answer_lists_and_normalise_case():
    assert accepted_answers({"answer": " Red."}) == ["red"]
    assert accepted_answers({"answers": ["Two", "2"]}) == ["two", "2"]


def test_items_without_question_or_answer_are_a_clear_error(tmp_path):
    data = tmp_path / "qa.jsonl"
    (tmp_path / "x.png").write_bytes(b"")
    data.write_text(json.dumps({"image": "x.png", "question": "what?"}) + "\n")
    with pytest.raises(CalibrationDataError, match="item 1 needs 'question' and 'answer'"):
        vl_qa_accuracy(None, None, str(data))


def test_an_empty_set_or_a_missing_image_is_named_before_any_model_runs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationDataError, match="holds no items"):
        vl_qa_accuracy(None, None, str(empty))
    missing = tmp_path / "qa.jsonl"
    missing.write_text(json.dumps({"image": "gone.png", "question": "what?", "answer": "red"}) + "\n")
    with pytest.raises(CalibrationDataError, match="qa.jsonl:1: image 'gone.png' does not exist"):
        vl_qa_accuracy(None, None, str(missing))


@pytest.mark.slow
def test_generic_jsonl_with_answer_lists_scores_like_the_reference_set(tmp_path):
    from moecompress.models import load_model
    from moecompress.pipeline import load_tokenizer_or_processor

    vl = require_shared(SHAPES.parent.parent / "models" / "moe-tiny-vl")
    items = [json.loads(line) for line in (SHAPES / "eval.jsonl").read_text().splitlines()[:24]]
    generic = tmp_path / "generic.jsonl"
    with generic.open("w") as f:
        for item in items:
            answers = [item["answer"].upper(), "definitely not this"]
            f.write(
                json.dumps({"image": str(SHAPES / item["image"]), "question": item["question"], "answers": answers})
                + "\n"
            )
    model = load_model(str(vl), trust_remote_code=True).model
    processor = load_tokenizer_or_processor(str(vl), True, trust_remote_code=True)
    reference = vl_qa_accuracy(model, processor, str(SHAPES / "eval.jsonl"), max_items=24, progress=False)
    result = vl_qa_accuracy(model, processor, str(generic), progress=False)
    assert result.items == 24 and result.accuracy == reference.accuracy and reference.accuracy > 0.8
