import copy

import pytest
import torch

from moecompress.calibration.data import CalibrationBatch
from moecompress.errors import CheckpointError, RecipeError
from moecompress.formats import pack, ternary_format
from moecompress.models import get_adapter
from moecompress.models.base import PROJECTIONS
from moecompress.quant.rtn import quantize_rtn
from moecompress.runtime import PackedExperts, native
from moecompress.runtime.packed_experts import ExpertList, install_packed_experts
from moecompress.training.qat import QATExperts, RecoveryConfig, recover_quantized_experts

from ..models.tiny_models import tiny_model

TERNARY = ternary_format(16)


def ternary_student(teacher):
    """A copy of `teacher` whose routed experts are RTN-ternarized and packed."""
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student.config.model_type)
    for view in adapter.moe_blocks(student):
        packed = [
            {p: pack(quantize_rtn(view.expert_weights(e)[p].detach(), TERNARY)) for p in PROJECTIONS}
            for e in range(view.num_experts)
        ]
        install_packed_experts(view, packed, ["rtn"] * view.num_experts)
    return student, adapter


def routed_inputs(module, tokens=40):
    hidden = torch.randn(tokens, module.hidden_size)
    index = torch.randint(0, module.num_experts, (tokens, 2))
    return hidden, index, torch.rand(tokens, 2)


def test_fake_quant_experts_compute_exactly_what_the_packed_ones_do(monkeypatch):
    monkeypatch.setattr(native, "INT8_TOKENS", 0)  # float32 activations: the same arithmetic as QAT
    student, adapter = ternary_student(tiny_model("qwen3_moe"))
    packed = adapter.moe_blocks(student)[0].experts
    qat = QATExperts.from_packed(packed)
    args = routed_inputs(packed)
    with torch.no_grad():
        # the torch reference path does the same float32 arithmetic; the native kernels sum in another order
        assert torch.allclose(qat(*args), ExpertList.forward(packed, *args), rtol=1e-5, atol=1e-6)
        assert float((qat(*args) - packed(*args)).norm() / qat(*args).norm()) < 1e-5
    again = qat.to_packed()
    for a, b in zip(packed.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_straight_through_gradients_reach_latent_weights_and_scales():
    student, adapter = ternary_student(tiny_model("qwen3_moe"))
    qat = QATExperts.from_packed(adapter.moe_blocks(student)[0].experts)
    hidden, index, weights = routed_inputs(qat)
    qat(hidden, index, weights).pow(2).sum().backward()
    used = int(index[0, 0])
    proj = qat[used].down_proj
    assert proj.weight.grad.abs().sum() > 0 and proj.scale.grad.abs().sum() > 0


def batches(vocab, n=4, poison_at=None):
    g = torch.Generator().manual_seed(3)
    out = [CalibrationBatch({"input_ids": torch.randint(0, vocab, (2, 24), generator=g)}) for _ in range(n)]
    if poison_at is not None:
        out[poison_at] = CalibrationBatch({"input_ids": torch.full((2, 24), vocab + 5)})
    return out


def run(teacher, data, steps, state_dir=None, fingerprint="job"):
    student, adapter = ternary_student(teacher)
    config = RecoveryConfig(enabled=True, steps=steps, lr=3e-3, scale_lr=1e-3, checkpoint_every=2)
    report = recover_quantized_experts(student, teacher, adapter, data, config, state_dir, fingerprint, progress=False)
    return student, report


def test_recovery_lowers_the_distillation_loss_and_leaves_packed_experts():
    teacher = tiny_model("qwen3_moe")
    student, report = run(teacher, batches(teacher.config.vocab_size), steps=12)
    assert report.final_loss < 0.7 * report.first_loss
    assert all(isinstance(v.experts, PackedExperts) for v in get_adapter("qwen3_moe").moe_blocks(student))
    assert not any(p.requires_grad for p in student.parameters())


def test_an_interrupted_recovery_resumes_to_the_uninterrupted_result(tmp_path):
    teacher = tiny_model("qwen3_moe")
    vocab = teacher.config.vocab_size
    uninterrupted, _ = run(teacher, batches(vocab), steps=6)
    with pytest.raises(IndexError):
        run(
            teacher, batches(vocab, poison_at=3), steps=6, state_dir=tmp_path
        )  # crashes at step 3; state of step 2 kept
    resumed, report = run(teacher, batches(vocab), steps=6, state_dir=tmp_path)
    assert report.resumed_from == 2
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="another job"):
        run(teacher, batches(vocab), steps=6, state_dir=tmp_path, fingerprint="other")


def test_recovery_refuses_experts_with_biases():
    teacher = tiny_model("gpt_oss")
    student, adapter = ternary_student(teacher)
    assert adapter.moe_blocks(student)[0].experts.has_bias
    with pytest.raises(RecipeError, match="biases"):
        recover_quantized_experts(student, teacher, adapter, [], RecoveryConfig(enabled=True, steps=1), None, "job")
