"""A post-grad inductor pass of the compiled decode step: the native linear calls that read the same activations (a
layer's q, k and v projections; a shared expert's gate and up) become one multi-weight call, so the activations are
quantized once and all their rows stream in one parallel loop (one fork and join instead of three; the short k and v
rows no longer each pay the prefetchers' ramp). The ops are `runtime/decode.py`'s; this module names them only
through `torch.ops` at graph time."""

from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


def _fusions() -> list[tuple]:
    """(single op, multi op, the single op's activation argument, how the multi op's arguments come from the single
    ops' calls)."""
    ops = torch.ops.moecompress
    return [
        (
            ops.dense_linear.default,
            ops.dense_linears.default,
            2,
            lambda calls, x: ([c.args[0] for c in calls], [c.args[1] for c in calls], x),
        ),
        (
            ops.quantized_linear.default,
            ops.quantized_linears.default,
            1,
            lambda calls, x: ([c.args[0] for c in calls], x),
        ),
    ]


def _independent(call: torch.fx.Node, x: torch.fx.Node, position: int) -> bool:
    """Whether `call`'s arguments other than x exist from the graph's start (weights, biases, constants)."""
    others = [a for i, a in enumerate(call.args) if i != position]
    return all(not isinstance(a, torch.fx.Node) or a.op in ("placeholder", "get_attr") for a in others)


class SharedInputFusion(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        order = {node: i for i, node in enumerate(graph.nodes)}
        for single, multi, position, arguments in _fusions():
            for x in [n for n in graph.nodes if n.op != "output"]:
                calls = sorted(
                    (
                        u
                        for u in x.users
                        if u.target is single and u.args[position] is x and _independent(u, x, position)
                    ),
                    key=order.__getitem__,
                )
                if len(calls) > 1:
                    self._fuse(graph, calls, multi, arguments(calls, x))

    @staticmethod
    def _fuse(graph: torch.fx.Graph, calls: list[torch.fx.Node], multi, args: tuple) -> None:
        with graph.inserting_before(calls[0]):
            fused = graph.call_function(multi, args)
        fused.meta["val"] = [c.meta.get("val") for c in calls]
        for i, call in enumerate(calls):
            with graph.inserting_before(call):
                item = graph.call_function(operator.getitem, (fused, i))
            item.meta.update(call.meta)
            call.replace_all_uses_with(item)
            graph.erase_node(call)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
