"""Perplexity by the reference models' protocol: the file as one token stream (jsonl documents each
followed by EOS), consecutive non-overlapping windows (last partial window kept), each scored on its
own; ppl = exp(total NLL / predicted tokens). Each window's NLL is kept, for standard errors and paired comparisons of
two models on the same windows (`paired_difference`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.data import read_text_file, read_texts, token_stream
from ..errors import CalibrationDataError, NonFiniteError, RecipeError


@dataclass
class PerplexityResult:
    data: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    nll_stderr: float = 0.0  # standard error of `nll` over the windows (0 for one window)
    window_nll: list[float] = field(default_factory=list, repr=False)  # each window's summed NLL, in order
    window_tokens: list[int] = field(default_factory=list, repr=False)  # and its predicted tokens

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("window_nll", "window_tokens")}


def _ratio_stderr(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of sum(sums) / sum(counts) over independent windows (the ratio estimator's)."""
    if len(sums) < 2:
        return 0.0
    mean = sums.sum() / counts.sum()
    spread = ((sums - mean * counts) ** 2).sum() * len(sums) / (len(sums) - 1)
    return float(spread.sqrt() / counts.sum())


def paired_difference(a: PerplexityResult, b: PerplexityResult) -> tuple[float, float]:
    """(mean NLL of a minus b, its standard error) over the windows both scored: a paired comparison, which cancels
    how hard each window is (log ppl differences; ppl_a / ppl_b = exp of the first)."""
    if a.window_tokens != b.window_tokens:
        raise ValueError("paired_difference: the results were not computed on the same windows")
    sums = torch.tensor(a.window_nll, dtype=torch.float64) - torch.tensor(b.window_nll, dtype=torch.float64)
    counts = torch.tensor(a.window_tokens, dtype=torch.float64)
    return float(sums.sum() / counts.sum()), _ratio_stderr(sums, counts)


def evaluation_stream(source: str, tokenizer) -> torch.Tensor:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json"):
        return torch.tensor(tokenizer(read_text_file(path), add_special_tokens=False)["input_ids"], dtype=torch.long)
    return token_stream(read_texts(source), tokenizer)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    source: str,
    seq_len: int = 512,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    config = getattr(model, "config", None)
    longest = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if longest is not None and seq_len > longest:
        raise RecipeError(
            f"seq_len {seq_len} is above the model's {longest} positions; use --seq-len {longest} or less."
        )
    stream = evaluation_stream(source, tokenizer)
    if stream.numel() < 2:
        raise CalibrationDataError(f"'{source}' has fewer than two tokens; nothing to evaluate.")
    windows = list(stream.split(seq_len))
    if windows[-1].numel() < 2:
        windows.pop()
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    window_nll, window_tokens = [], []
    full = [w for w in windows if w.numel() == seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if w.numel() != seq_len]
    for ids in tqdm(batches, desc=f"ppl {Path(source).name}", disable=not progress):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        window_nll += nll.view(ids.shape[0], -1).double().sum(1).tolist()
        window_tokens += [ids.shape[1] - 1] * ids.shape[0]
    total_tokens = sum(window_tokens)
    mean = sum(window_nll) / total_tokens
    if not math.isfinite(mean):
        raise NonFiniteError(
            f"the model's loss on '{source}' is {mean} (non-finite logits): its weights hold NaN/Inf "
            "or overflow in this dtype; check the checkpoint, or evaluate in float32."
        )
    sums, counts = torch.tensor(window_nll, dtype=torch.float64), torch.tensor(window_tokens, dtype=torch.float64)
    return PerplexityResult(
        str(source),
        math.exp(mean),
        mean,
        total_tokens,
        len(windows),
        _ratio_stderr(sums, counts),
        window_nll,
        window_tokens,
    )
