"""Running an ONNX file written by :func:`lightning_compress.onnx_export.export_onnx` in onnxruntime.

Kept apart from the export, which needs onnx and onnxscript besides: reading needs onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import Tensor

from lightning_compress.artifact_calls import check_call

__all__ = [
    "FIXED_KEY", "GRAPH_DIGEST_KEY", "OPTIMIZATION_KEY", "OUTPUTS_KEY", "POSITIONAL_KEY", "graph_digest", "inference_session", "load_onnx"
]

_EXTRA = 'format="onnx" needs onnx, onnxscript and onnxruntime: pip install "lightning-compress[onnx]"'

#: The file's model-level metadata key holding, as a JSON list, the names of the inputs ``forward`` takes
#: positionally, in its parameter order (the file's own input order follows the export example's).
POSITIONAL_KEY = "lightning_compress.positional_inputs"

#: The metadata key holding the SHA-256 of the file's graph (nodes and weights), checked by :func:`load_onnx`:
#: onnxruntime runs a damaged weight without any error (a flipped bit of one weight was 0.028 off).
GRAPH_DIGEST_KEY = "lightning_compress.graph_sha256"

#: The metadata key naming the onnxruntime graph optimisation level the file was checked at
#: (``"disable_all"``), where onnxruntime's default fusions would compute differently from the model.
OPTIMIZATION_KEY = "lightning_compress.graph_optimization"

#: The metadata key holding the structure of the model's output as JSON: ``spec``, a pytree spec (a tuple of two
#: tensors, a dict ``{"logits": ...}``), and ``none``, the leaves that were ``None`` (the graph has no output for
#: them); :func:`load_onnx` rebuilds the structure from the file's flat outputs.
OUTPUTS_KEY = "lightning_compress.outputs"

#: The metadata key holding, as a JSON object, the keyword settings the export's example fixed in the graph
#: (``{"use_cache": false}``): a call may pass them again with those values (:func:`~lightning_compress.artifact_calls.check_call`).
FIXED_KEY = "lightning_compress.fixed_settings"


def graph_digest(graph: Any) -> str:
    """SHA-256 of an ONNX ``GraphProto``'s deterministic serialisation: every node, attribute and weight."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def inference_session(path: str | os.PathLike[str], optimization: str | None = None) -> Any:
    """An onnxruntime CPU session of the file at ``path``, at its graph optimisation level: ``optimization``,
    else the level the file records (:data:`OPTIMIZATION_KEY`), else onnxruntime's default (all)."""
    import onnxruntime

    def session(level: str | None) -> Any:
        options = onnxruntime.SessionOptions()
        if level == "disable_all":
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])

    made = session(optimization)
    recorded = made.get_modelmeta().custom_metadata_map.get(OPTIMIZATION_KEY)
    return session(recorded) if optimization is None and recorded not in (None, "all") else made


def _check_digest(path: str | os.PathLike[str], recorded: str) -> None:
    try:
        import onnx
    except ImportError:  # reading needs onnxruntime only; the check needs onnx too
        return
    if graph_digest(onnx.load(os.fspath(path)).graph) != recorded:
        raise ValueError(
            f"{os.fspath(path)!r} is damaged: its graph (nodes and weights) does not match the SHA-256 recorded when it "
            "was written; export it again"
        )


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """A callable running the ONNX file at ``path`` in onnxruntime: tensors in, the model's output out, in the
    structure the file records (:data:`OUTPUTS_KEY`: a tensor, a tuple, a dict such as ``{"logits": ...}``); a file
    without that record returns its one output as a tensor, or all of them as a tuple.

    Inputs go by the names of the model's ``forward`` arguments, or positionally in ``forward``'s order
    (as the file records it: :data:`POSITIONAL_KEY`). A file that records its graph's SHA-256
    (:data:`GRAPH_DIGEST_KEY`) is checked against it first (when onnx is installed), and runs at the
    graph optimisation level it records (:data:`OPTIMIZATION_KEY`). A file without that record takes positional
    tensors only when it has a single input. Floating tensors are cast to float32 where the file takes
    float32 (a file exported from a bfloat16 model).

    Raises:
        ImportError: onnxruntime is missing.
        ValueError: the file is not a model onnxruntime can load, or its graph does not match its recorded digest.
        TypeError: (when called) positional tensors the file cannot place, an unknown, repeated or
            missing input; the message lists the file's inputs.
    """
    try:
        import onnxruntime  # noqa: F401 - checked here, used by inference_session
    except ImportError as err:
        raise ImportError(_EXTRA) from err
    try:
        session = inference_session(path)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"{os.fspath(path)!r} is not an ONNX model onnxruntime can load ({type(err).__name__}: {err})") from err
    metadata = session.get_modelmeta().custom_metadata_map
    if GRAPH_DIGEST_KEY in metadata:
        _check_digest(path, metadata[GRAPH_DIGEST_KEY])
    names = [i.name for i in session.get_inputs()]
    takes_float = {i.name for i in session.get_inputs() if i.type == "tensor(float)"}
    recorded = metadata.get(POSITIONAL_KEY)
    positional: list[str] | None = json.loads(recorded) if recorded is not None else (names if len(names) == 1 else None)
    record = json.loads(metadata[OUTPUTS_KEY]) if OUTPUTS_KEY in metadata else None
    spec = torch.utils._pytree.treespec_loads(record["spec"]) if record else None
    nones = set(record["none"]) if record else set()  # leaves the model returned as None: not in the graph
    fixed = json.loads(metadata[FIXED_KEY]) if FIXED_KEY in metadata else {}

    def run(*inputs: Tensor, **named: Tensor) -> Any:
        if inputs and positional is None:
            raise TypeError(
                f"{os.fspath(path)!r} does not record the order of forward's arguments; call it by keyword: {', '.join(names)}"
            )
        named = check_call(os.fspath(path), positional if positional is not None else [], names, inputs, named, fixed)
        feed = dict(zip(positional or [], inputs))
        feed.update(named)
        arrays = {n: (x.float() if n in takes_float and x.is_floating_point() else x).detach().cpu().numpy() for n, x in feed.items()}
        outputs = [torch.from_numpy(a) for a in session.run(None, arrays)]
        if spec is not None and spec.num_leaves == len(outputs) + len(nones):
            tensors = iter(outputs)
            return torch.utils._pytree.tree_unflatten([None if i in nones else next(tensors) for i in range(spec.num_leaves)], spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run
