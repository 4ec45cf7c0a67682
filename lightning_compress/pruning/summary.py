"""The pruning section of the compression report (JSON-ready)."""

from __future__ import annotations

from typing import Any

from lightning_compress.pruning.mask_storage import storage_bytes
from lightning_compress.pruning.state import PruningState
from lightning_compress.schedules import make_schedule, schedule_state

__all__ = ["pruning_summary"]


def pruning_summary(callback: Any, run: PruningState | None) -> dict[str, Any]:
    """Per-layer sparsity and storage, the schedule, the guard's record and notes for the report.

    ``callback`` supplies the options (``structure``, ``criterion``, ``scope``...); ``run`` the state.
    """
    layers: dict[str, Any] = {}
    dense = sparse = 0
    zeros = run.layer_zeros() if run is not None and run.masks else {}
    # the masks' counts, for a finished run that a later fit trained freely (the figures below are the weights' own)
    kept = run.layer_kept() if zeros and run.finished else {}  # type: ignore[union-attr]
    for n in zeros:
        p = run.params[n]  # type: ignore[union-attr]  # the whole weight, also when this process holds some rows
        entry: dict[str, Any] = {
            "shape": list(p.shape),
            "numel": p.numel(),
            "nonzero": p.numel() - zeros[n],
            "sparsity": zeros[n] / max(1, p.numel()),
            "target": run.targets.get(n, 0.0),  # type: ignore[union-attr]
        }
        if callback.options.kind == "unstructured":
            est = storage_bytes(p.numel(), entry["nonzero"], p.shape[0] if p.dim() else 1, p.element_size())
            entry.update(est)
            dense += est["dense_bytes"]
            sparse += est["sparse_bytes"]
        layers[n] = entry
    schedule = callback.schedule
    out: dict[str, Any] = {
        "structure": callback.structure,
        "criterion": callback.criterion.name,
        "scope": callback.scope,
        "schedule": schedule if isinstance(schedule, str) else schedule_state(make_schedule(schedule)),
        "start_epoch": callback.start_epoch,
        "end_epoch": callback._end,
        "target_sparsity": callback.target_sparsity,
        "sparsity": run.sparsity_from(zeros) if run is not None else 0.0,
        # counted once above (a sum over the processes when sharded); once the channels are removed, as they were
        "nonzero": run.nonzero_from(zeros) if run is not None else 0,
        "total": run.total if run is not None else 0,
        "updates": run.updates if run is not None else 0,
        "history": list(run.history) if run is not None else [],
        "layers": layers,
        "guard": {
            "monitor": callback.monitor,
            "max_drop": callback.max_drop,
            "baseline": run.baseline if run is not None else None,
            "stopped": run.frozen if run is not None else False,
            "events": list(run.guard_events) if run is not None else [],
        },
    }
    out["granularity"] = out["structure"]  # the former key, for readers of earlier reports
    if callback.options.kind == "unstructured" and layers:
        out["storage"] = {"dense_bytes": dense, "sparse_bytes": sparse, "ratio": dense / max(1, sparse)}
    if callback.options.kind == "channel" and run is not None and run.keep and run.shrunk is None:
        out["channels"] = {"+".join(g.members): {"kept": int(k.sum()), "total": g.size} for g, k in zip(run.groups, run.keep)}
    events = run.guard_events if run is not None else []
    notes = list(callback.fit_warnings) + [
        f"accuracy guard at epoch {e['epoch']}: {e['monitor']}={e['value']:.4g} is more than {e['max_drop']:g} "
        f"worse than its baseline {e['baseline']:.4g}; restored sparsity {e['restored_sparsity']:.2%} and stopped pruning"
        for e in events
    ]
    if "storage" in out:
        notes.append(
            f"sparse storage estimate {out['storage']['sparse_bytes']:,} B vs dense {out['storage']['dense_bytes']:,} B "
            f"({out['storage']['ratio']:.2f}x)"
        )
    regrown = sum(run.params[n].numel() - zeros[n] - kept[n] for n in kept)  # type: ignore[union-attr]
    if regrown > 0:
        notes.append(
            f"the run reached its end in an earlier fit (make_permanent=True), and later training has made {regrown:,} "
            "of its pruned weights non-zero again: the figures above are the weights' own"
        )
    if run is not None and run.shrunk is not None:
        out["shrunk"] = run.shrunk
        cuts = ", ".join(f"{name} {a}->{b}" for name, (a, b) in sorted(run.shrunk["channels"].items()))
        notes.append(f"channels removed at epoch {run.shrunk['epoch']:g}: {cuts}")
    if notes:
        out["notes"] = notes
    return out
