"""Perplexity by the reference models' protocol: the file as one token stream (jsonl documents each
followed by EOS), consecutive non-overlapping windows (last partial window kept), each scored on its
own; ppl = exp(total NLL / predicted tokens)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.data import read_text_file, read_texts, token_stream
from ..errors import CalibrationDataError, NonFiniteError


@dataclass
class PerplexityResult:
    data: str
    ppl: float
    nll: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_stream(source: str, tokenizer) -> torch.Tensor:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix != ".jsonl":
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
    stream = evaluation_stream(source, tokenizer)
    if stream.numel() < 2:
        raise CalibrationDataError(f"'{source}' has fewer than two tokens; nothing to evaluate.")
    windows = list(stream.split(seq_len))
    if windows[-1].numel() < 2:
        windows.pop()
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    full = [w for w in windows if w.numel() == seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if w.numel() != seq_len]
    for ids in tqdm(batches, desc=f"ppl {Path(source).name}", disable=not progress):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise NonFiniteError(
            f"the model's loss on '{source}' is {mean} (non-finite logits): its weights hold NaN/Inf "
            "or overflow in this dtype; check the checkpoint, or evaluate in float32."
        )
    return PerplexityResult(str(source), math.exp(mean), mean, total_tokens, len(windows))
