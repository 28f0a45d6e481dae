"""lm-evaluation-harness tasks on an in-memory model (a packed checkpoint runs through its own modules).

Any task name lm-eval knows works (`hellaswag`, `arc_easy`, ... when their datasets can be reached);
`eval/tasks/` holds offline tasks built from local files (`moe_wiki_mc`, `moe_code_mc`, tag `moe_local`).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import CalibrationDataError

DEFAULT_INCLUDE_PATH = Path(__file__).resolve().parents[2] / "eval" / "tasks"


def _metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys -> {"acc": x, "acc_stderr": y}, numbers only."""
    out = {}
    for key, value in task_results.items():
        metric, _, filter_name = key.partition(",")
        if (
            metric != "sample_len"
            and isinstance(value, (int, float))
            and not (isinstance(value, float) and math.isnan(value))
        ):
            out[metric if filter_name in ("", "none") else f"{metric}_{filter_name}"] = float(value)
    return out


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model`; per task its metrics (acc, acc_norm, ... and their stderr)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = Path(include_path) if include_path else DEFAULT_INCLUDE_PATH
    if include_path and not include.is_dir():
        raise CalibrationDataError(f"--include-path '{include_path}' is not a folder of lm-eval task YAMLs.")
    manager = TaskManager(include_path=str(include) if include.is_dir() else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise CalibrationDataError(
            f"lm-eval does not know the task(s) {unknown}; list them with `lm-eval ls tasks`, or point "
            f"--include-path at a folder of task YAMLs (default {DEFAULT_INCLUDE_PATH})."
        )
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=1000,
        )
    except OSError as exc:  # a missing data file, or a hub dataset that cannot be reached
        raise CalibrationDataError(
            f"a task's data could not be read ({exc}). The offline tasks in eval/tasks read ../shared/data relative "
            "to the repository root (run from there); standard tasks download their datasets from the Hub."
        ) from exc
    return {task: _metrics(values) for task, values in results["results"].items()}
