"""GPTQ (Frantar et al., 2022): column-wise quantization with Hessian-based error feedback."""

from __future__ import annotations

import math

import torch

from ..errors import MoECompressError
from ..formats import SCALE_DTYPE, QTensor, QuantFormat, expand_scales
from .rtn import search_qparams


def quantize_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: QuantFormat,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
    ternary_scale: str = "lsq",
) -> QTensor:
    """Quantize `w` [out, in] given the input Hessian `hessian` [in, in] (any positive scale of X^T X).

    With `act_order`, columns are processed by decreasing Hessian diagonal while the group
    parameters stay those of the natural column order ("static groups"), so no g_idx is needed.
    Formats whose scales are chosen from the whole matrix (ternary, by the `ternary_scale` method) take them from the
    unmodified weights up front, and GPTQ then only chooses the codes.
    """
    options = dict(act_order=act_order, block_size=block_size, clip_search=clip_search, ternary_scale=ternary_scale)
    return quantize_gptq_batched([([w], hessian)], [fmt], damp, **options)[0][0]


def quantize_gptq_shared(
    weights: list[torch.Tensor], hessian: torch.Tensor, formats: list[QuantFormat], **options
) -> list[QTensor]:
    """`quantize_gptq` of each `weights[k]` in `formats[k]` (one group size), all on the same inputs `hessian`: an
    expert's gate and up projections, or one matrix in several formats (pass it once per format). GPTQ treats rows
    independently, so the matrices share one inverse Cholesky factor and one column loop: the codes are those of
    one call each, and the shared Python loop is most of GPTQ's time on small matrices. `options`: those of
    `quantize_gptq`."""
    return quantize_gptq_batched([(weights, hessian)], formats, **options)[0]


def quantize_gptq_batched(
    problems: list[tuple[list[torch.Tensor], torch.Tensor]],
    formats: list[QuantFormat],
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
    ternary_scale: str = "lsq",
) -> list[list[QTensor]]:
    """`quantize_gptq_shared` of several experts at once: `problems[b]` is one expert's (weights, hessian), every
    expert's weights of the same shapes, in `formats`. One column loop runs over the stack: each column is one step
    for all the experts (their error feedback element-wise, their block updates one product each), so small
    experts are not bound by per-call overhead; each expert's codes are bit for bit those of its own call."""
    _check(problems, act_order)
    if formats[0].span:
        if act_order:
            raise ValueError(f"{formats[0].name}: act_order is not available for block formats (GGML types)")
        return _by_format(problems, formats, lambda p, f: _gptq_spans(p, f, damp, block_size))
    weights = problems[0][0]
    in_features = weights[0].shape[1]
    group = formats[0].effective_group(in_features)
    if any(f.effective_group(in_features) != group for f in formats):
        raise ValueError(f"formats {[f.name for f in formats]} differ in group size")
    sizes = [w.shape[0] for w in weights]
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    device = weights[0].device
    maxq = torch.cat([torch.full((n,), float(f.maxq), device=device) for n, f in zip(sizes, formats)])
    n_groups, batch = formats[0].groups(in_features), len(problems)
    scales = torch.zeros(n_groups, batch, bounds[-1], device=device)  # [group, expert, row]
    zeros = torch.zeros_like(scales)
    static = [act_order] * len(formats)  # scales chosen before the column loop (act_order, or from the whole matrix)
    qparams = search_qparams if clip_search else (lambda block, f: f.group_params(block))

    WT, h_inv, perm = [], [], None
    for b, (ws, hessian) in enumerate(problems):
        W, H = _live(ws, hessian)
        for k, f in enumerate(formats):
            fixed = f.matrix_scales(W[rows[k]], ternary_scale)
            if fixed is not None:
                static[k] = True
                scales[:, b, rows[k]] = expand_scales(fixed, sizes[k]).T
                zeros[:, b, rows[k]] = float(f.fixed_zero)
            elif act_order:
                for g in range(n_groups):
                    scales[g, b, rows[k]], zeros[g, b, rows[k]] = qparams(W[rows[k], g * group : (g + 1) * group], f)
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            H = H[perm][:, perm]
        WT.append((W.T[perm] if act_order else W.T).contiguous())  # [in, rows]: a column is one contiguous row
        h_inv.append(_inverse_cholesky(H, damp))
    WT, h_inv = torch.stack(WT), torch.stack(h_inv)
    order = perm.tolist() if act_order else list(range(in_features))  # a host list, not a device sync per column

    def find_params(columns: torch.Tensor, g: int) -> None:  # at a group's first column, from its columns
        for b in range(batch):
            for k, f in enumerate(formats):
                if not static[k]:
                    scales[g, b, rows[k]], zeros[g, b, rows[k]] = qparams(columns[b, rows[k]], f)

    # a group's parameters must see every earlier column's error: sub-blocks then start at every group start
    inner = math.gcd(_INNER, block_size, group if group < in_features and not all(static) else block_size)
    codes = _column_loop(WT, h_inv, order, group, scales, zeros, maxq, find_params, block_size, inner)
    if act_order:
        codes = codes[:, :, torch.argsort(perm)]
    out = []
    for b in range(batch):
        out.append([])
        for k, f in enumerate(formats):
            n = f.scale_rows(sizes[k])
            s, z = scales[:, b, rows[k]].T[:n], zeros[:, b, rows[k]].T[:n]
            out[-1].append(QTensor(codes[b, rows[k]].to(torch.uint8), s.to(SCALE_DTYPE), z.to(torch.uint8), f))
    return out


def _by_format(problems, formats, run) -> list[list[QTensor]]:
    """`run(problems, fmt)` once per distinct format, on the matrices of that format; results in the given order."""
    out = [[None] * len(formats) for _ in problems]
    for fmt in dict.fromkeys(formats):
        ks = [k for k, f in enumerate(formats) if f == fmt]
        done = run([([ws[k] for k in ks], h) for ws, h in problems], fmt)
        for b, qts in enumerate(done):
            for k, q in zip(ks, qts):
                out[b][k] = q
    return out


def _gptq_spans(problems, fmt: QuantFormat, damp: float, block_size: int) -> list[list[QTensor]]:
    """GPTQ onto a format whose grid is chosen a block of `fmt.span` columns at a time (llama.cpp's types): at each
    block's first column its sub-block scales (and K-quants' fp16 super-scales) are chosen from the columns as GPTQ
    has updated them so far, weighted by the Hessian's diagonal (llama.cpp's importance matrix); the codes then
    follow column by column with error feedback."""
    sizes = [w.shape[0] for w in problems[0][0]]
    in_features, n_rows, batch = problems[0][0][0].shape[1], sum(sizes), len(problems)
    group, span = fmt.group_size, fmt.span
    fmt.check_row(in_features)
    live = [_live(ws, h) for ws, h in problems]
    WT = torch.stack([W.T.contiguous() for W, _ in live])
    importance = torch.stack([torch.diag(H).clamp(min=0) for _, H in live])
    h_inv = torch.stack([_inverse_cholesky(H, damp) for _, H in live])
    n_sub, device = in_features // group, WT.device
    scales, zeros = torch.zeros(n_sub, batch, n_rows, device=device), torch.zeros(n_sub, batch, n_rows, device=device)
    raw = torch.zeros(2, batch, n_rows, n_sub, device=device)
    supers = torch.zeros(batch, n_rows, in_features // span, 2, device=device)
    two_level = False  # the format has super-scales (K-quants)

    def columns(c0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:  # as GPTQ has updated them, [rows, width]
        w = WT[:, c0 : c0 + width].transpose(1, 2).reshape(batch * n_rows, width)
        return w, importance[:, None, c0 : c0 + width].expand(batch, n_rows, width).reshape(batch * n_rows, width)

    def find_params(_, g: int) -> None:
        nonlocal two_level
        c0, k = g * group, span // group
        if c0 % span == 0:  # a block begins: its super-scales and first guesses of every sub-block's codes
            sc, zr, su = fmt.span_params(*columns(c0, span))
            raw[0, :, :, g : g + k], raw[1, :, :, g : g + k] = sc.view(batch, n_rows, k), zr.view(batch, n_rows, k)
            if su is not None:
                two_level = True
                supers[:, :, c0 // span] = su.view(batch, n_rows, 2)
            s, z = fmt.effective(sc, zr, su)
            scales[g : g + k], zeros[g : g + k] = (x.view(batch, n_rows, k).permute(2, 0, 1) for x in (s, z))
        if two_level:  # each sub-block's codes again on its columns as they are when GPTQ reaches them
            su = supers[:, :, c0 // span].reshape(batch * n_rows, 2)
            refined = fmt.refine(*columns(c0, group), su, raw[0, :, :, g].reshape(-1), raw[1, :, :, g].reshape(-1))
            if refined is not None:
                sc, zr, s, z = (x.view(batch, n_rows) for x in refined)
                raw[0, :, :, g], raw[1, :, :, g], scales[g], zeros[g] = sc, zr, s, z

    maxq = torch.full((n_rows,), float(fmt.maxq), device=device)
    inner = math.gcd(_INNER, block_size, span)
    order = list(range(in_features))
    codes = _column_loop(WT, h_inv, order, group, scales, zeros, maxq, find_params, block_size, inner, fmt.offset_grid)
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [
        [
            QTensor(
                codes[b, a:e].to(torch.uint8),
                raw[0, b, a:e],
                raw[1, b, a:e],
                fmt,
                supers[b, a:e] if two_level else None,
            )
            for a, e in zip(bounds, bounds[1:])
        ]
        for b in range(batch)
    ]


def _check(problems: list[tuple[list[torch.Tensor], torch.Tensor]], act_order: bool) -> None:
    weights = problems[0][0]
    in_features = weights[0].shape[1]
    for ws, h in problems:
        if h.shape != (in_features, in_features) or any(w.shape[1] != in_features for w in ws):
            raise ValueError(f"hessian shape {tuple(h.shape)} does not match weight in_features {in_features}")
        if [w.shape for w in ws] != [w.shape for w in weights]:
            raise ValueError("experts quantized at once must have the same shapes")
    if act_order and len(problems) > 1:
        raise ValueError("act_order orders each expert's columns by its own Hessian: one expert at a time")


def _live(weights: list[torch.Tensor], hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked weights [rows, in] and the Hessian in float32, inputs that never fire (zero diagonal) zeroed in
    the weights and given a unit diagonal."""
    W = torch.cat([w.to(torch.float32) for w in weights])
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


_INNER = 16  # columns whose errors are applied one by one; the rest of a block gets them as one product


def _column_loop(
    WT, h_inv, order, group, scales, zeros, maxq, find_params, block_size, inner, offset=False
) -> torch.Tensor:
    """GPTQ's loop over the columns of a stack of experts (rows of `WT` [experts, in, rows], updated in place) with
    lazy batch updates at two levels: the errors of a sub-block of `inner` columns reach the rest of its block as
    one product, a block's reach the columns after it as one product (per expert: a batched product would sum in
    another order). With `offset`, `zeros` are offsets of the grid s * q - off (formats with a stored min).
    Returns the codes [experts, rows, in]."""
    batch, in_features, n_rows = WT.shape
    codes = torch.empty_like(WT)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        errors = torch.empty(batch, i2 - i1, n_rows, device=WT.device)
        for j1 in range(i1, i2, inner):
            j2 = min(j1 + inner, i2)
            for i in range(j1, j2):
                column = order[i]
                g = column // group
                if column % group == 0:
                    find_params(WT[:, i : i + group].transpose(1, 2), g)
                s, z, d = scales[g], zeros[g], h_inv[:, i, i, None]
                w_col = WT[:, i]
                if offset:
                    q = torch.minimum(torch.clamp(torch.round((w_col + z) / s), min=0), maxq)
                    err = (w_col - (q * s - z)) / d
                else:
                    q = torch.minimum(torch.clamp(torch.round(w_col / s) + z, min=0), maxq)
                    err = (w_col - (q - z) * s) / d
                codes[:, i] = q
                WT[:, i + 1 : j2].addcmul_(h_inv[:, i, i + 1 : j2, None], err[:, None, :], value=-1)
                errors[:, i - i1] = err
            for b in range(batch):
                WT[b, j2:i2].addmm_(h_inv[b, j1:j2, j2:i2].T, errors[b, j1 - i1 : j2 - i1], alpha=-1)
        for b in range(batch):
            WT[b, i2:].addmm_(h_inv[b, i1:i2, i2:].T, errors[b], alpha=-1)
    return codes.transpose(1, 2)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1) after dampening; dampening grows until H is positive definite.
    With J the order reversal and J H J = M M^T, U = J M^-1 J: one factorization and one triangular inverse."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(6):
        damped = H + (damp * 10**attempt) * mean_diag * eye
        M, info = torch.linalg.cholesky_ex(damped.to(torch.float64).flip(0, 1))
        if info == 0:
            inverse = torch.linalg.solve_triangular(M, eye.to(torch.float64), upper=False)
            return inverse.flip(0, 1).to(torch.float32)
    raise MoECompressError(
        f"GPTQ: the Hessian stays singular even with dampening {damp * 1e5:g}; "
        "the calibration activations are degenerate (NaN/inf or all zero). Check the calibration data."
    )


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the squared output error over the calibration inputs."""
    delta = w.to(torch.float32) - w_hat.to(torch.float32)
    return float(torch.einsum("oi,ij,oj->", delta, hessian.to(torch.float32), delta))
