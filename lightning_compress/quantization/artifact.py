"""What :class:`~lightning_compress.QuantizeCallback` builds at the end of fit: the converted copy,
its sizes and CPU latency next to float, and the files it writes (``save_to``, ``export_to``)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils._pytree import tree_leaves

from lightning_compress.batches import ForwardCall, eval_mode
from lightning_compress.deploy import ONNX_TOLERANCE, compile_for_cpu, export
from lightning_compress.layout import input_batch_dim
from lightning_compress.measure import device_of, measure_latency, serialized_size, split_call
from lightning_compress.module_copy import copy_model
from lightning_compress.plugin import example_input, module_artifact, run_dir
from lightning_compress.quantization.convert import check_quantization_finite, convert_fake_quant
from lightning_compress.quantization.files import save_quantized
from lightning_compress.quantization.options import QuantizeOptions
from lightning_compress.quantization.layers import fake_quant_layers, strip_fake_quant
from lightning_compress.sharding import has_sharded_parameters, whole_copy

__all__ = [
    "check_quantization_finite",
    "convert_at_fit_end",
    "converted_copy",
    "float_copy",
    "hands_through",
    "network_and_call",
    "network_of",
    "measure_speed",
    "sizes",
    "uncompiled",
    "write_at_fit_end",
    "write_files",
]


def network_of(pl_module: LightningModule, n_layers: int, call: ForwardCall | None = None) -> nn.Module:
    """The network to convert, save and export (see :func:`network_and_call`)."""
    return network_and_call(pl_module, n_layers, call)[0]


def network_and_call(
    pl_module: LightningModule, n_layers: int, call: ForwardCall | None = None
) -> tuple[nn.Module, ForwardCall | None]:
    """The network to convert, save and export, holding every fake-quantised layer, and the call that runs it:
    the module's own artifact (a distillation student); else the network the training step calls (``call``,
    from :func:`~lightning_compress.plugin.example_input`): its ``target`` child, or for the module's own
    ``forward`` (target ``""``) the module itself, unless that ``forward`` only hands its inputs to ``model`` and
    returns its output (``return self.model(x)``, ``self.model(**batch).logits``; :func:`hands_through`): then
    ``model``, with the call it received (its ``target`` ``"model"``). Without a ``call``, ``model``; the whole
    module where no candidate holds every layer."""
    own = module_artifact(pl_module)
    if isinstance(own, nn.Module) and len(fake_quant_layers(own)) == n_layers:
        return own, call
    if call is not None and call.target:
        child = pl_module.get_submodule(call.target)
        return (child, call) if len(fake_quant_layers(child)) == n_layers else (pl_module, call)
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module) or len(fake_quant_layers(model)) != n_layers:
        return pl_module, call
    if call is None or type(pl_module).forward is LightningModule.forward:  # no forward of its own: a child is called
        return model, call
    inner = hands_through(pl_module, model, call)
    # the inner call names the child it runs: a CompressionReport measures the module's copy of it (its baseline)
    return (model, dataclasses.replace(inner, target="model")) if inner is not None else (pl_module, call)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in ``value``: a tensor, or nested tuples, lists, dicts (a ``ModelOutput`` is one) and
    dataclasses (which ``tree_leaves`` takes as one leaf: a network returning one was never "handed through")."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name, None))]
    return []


def hands_through(pl_module: LightningModule, child: nn.Module, call: ForwardCall) -> ForwardCall | None:
    """The call ``child`` receives when the module's ``forward``, run once on ``call`` (eval mode, no grad),
    only hands it its inputs and returns its output: ``child`` is called once, every tensor it receives is one of
    ``call``'s (the same objects, however packed: ``self.model(x)``, ``self.model(input_ids=ids, ...)``,
    ``self.model(**batch)``), and every tensor ``forward`` returns is one ``child`` returned (``.logits``). Then
    ``child``, called that way, is all ``forward`` computes; else ``None``: a ``forward`` that transforms an input
    (``self.model(x.flatten(1))``) or the output (``self.norm(self.model(x))``) is more."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any], list[Tensor], bool, list[int]]] = []
    # run on a copy of the inputs: a forward that changes its input in place must not change the example
    call = ForwardCall(*apply_to_collection((call.args, call.kwargs), Tensor, lambda t: t.clone()), call.target)
    inputs = _tensors((call.args, call.kwargs))
    versions = {id(t): t._version for t in inputs}  # an input changed in place (x /= 255) is not handed on unchanged

    @torch.compiler.disable  # in a compiled model too, read eagerly: version counters are not graph values
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        returned = _tensors(output)
        unchanged = all(t._version == versions[id(t)] for t in inputs)
        seen.append((args, kwargs, returned, unchanged, [t._version for t in returned]))

    handle = child.register_forward_hook(hook, with_kwargs=True)
    trainer = getattr(pl_module, "_trainer", None)
    precision = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
    try:
        with eval_mode(pl_module), torch.no_grad(), precision:
            out = _tensors(call(pl_module))
    finally:
        handle.remove()
    if len(seen) != 1:
        return None
    args, kwargs, returned, unchanged, returned_versions = seen[0]
    given = {id(t) for t in inputs}
    received = _tensors((args, kwargs))
    inner = {id(t): v for t, v in zip(returned, returned_versions)}
    if not unchanged or not received or not all(id(t) in given for t in received):
        return None
    if not out or not all(id(t) in inner and t._version == inner[id(t)] for t in out):  # .mul_(2) after the child
        return None
    # settings the forward adds may be constants (return_dict=True); a number it computes (from the input, say) is not
    constants = [v for v in tree_leaves((args, kwargs)) if not isinstance(v, Tensor)]
    own = [v for v in tree_leaves((call.args, call.kwargs)) if not isinstance(v, Tensor)]
    if any(isinstance(v, (int, float, complex)) and not isinstance(v, bool) and v not in own for v in constants):
        return None
    return ForwardCall(tuple(args), dict(kwargs))


def detached_copy(module: nn.Module) -> nn.Module | None:
    """A deep copy that does not drag the Trainer along. Of a network sharded by FSDP2: the whole network
    on rank 0 (:func:`~lightning_compress.sharding.whole_copy`, a collective: every rank calls it) and
    ``None`` on the other ranks."""
    lightning = isinstance(module, LightningModule)
    trainer = module._trainer if lightning else None
    if lightning:
        module._trainer = None
    try:
        return whole_copy(module) if has_sharded_parameters(module) else copy_model(module)
    finally:
        if lightning:
            module._trainer = trainer


def uncompiled(network: nn.Module) -> nn.Module:
    """The network a ``torch.compile(net)`` wrapper (``OptimizedModule``) runs, else ``network``: what is converted,
    saved and exported, so the files name the layers as the plain class does (no ``_orig_mod.``) and
    ``torch.export`` captures the network's own ``forward``."""
    inner = network._modules.get("_orig_mod") if isinstance(network, OptimizedModule) else None
    return inner if isinstance(inner, nn.Module) else network


def converted_copy(source: nn.Module, backend: str, on_nonfinite: str = "error") -> nn.Module | None:
    """A converted (real low-bit) copy of a fake-quantised network (the one a ``torch.compile`` wrapper runs: see
    :func:`uncompiled`); ``source`` is unchanged. ``None`` on the ranks other than 0 when ``source`` is sharded
    (see :func:`detached_copy`)."""
    model = detached_copy(uncompiled(source))
    return None if model is None else convert_fake_quant(model, backend=backend, inplace=True, on_nonfinite=on_nonfinite)


def float_copy(source: nn.Module) -> nn.Module | None:
    """A float copy of a fake-quantised network (the quantisers removed); ``None`` as :func:`converted_copy`."""
    model = detached_copy(source)
    if model is not None:
        strip_fake_quant(model)
    return model


def sizes(float_model: nn.Module, quantized: nn.Module) -> dict[str, Any]:
    """Bytes of both as ``torch.save`` state dicts (and as safetensors, where the layers allow it)."""
    out: dict[str, Any] = {"size_bytes": {"float": serialized_size(float_model), "quantized": serialized_size(quantized)}}
    out["size_ratio"] = out["size_bytes"]["float"] / max(1, out["size_bytes"]["quantized"])
    try:  # torchao layers cannot be stored as safetensors
        st = {"float": serialized_size(float_model, "safetensors"), "quantized": serialized_size(quantized, "safetensors")}
    except ValueError:
        return out
    out["size_bytes_safetensors"] = st
    out["size_ratio_safetensors"] = st["float"] / max(1, st["quantized"])
    return out


def measure_speed(float_model: nn.Module, quant: nn.Module, example: Any, latency: str, formats: set[str]) -> tuple[dict[str, Any], list[str]]:
    """CPU latency of float vs converted at batch 64, one intra-op thread, eager (and compiled with ``latency="both"``);
    plus the warnings to give when the converted model is slower, or when a measurement failed (the
    report then holds ``{"error": reason}`` for it). ``example`` is the call the training step makes
    (a ``ForwardCall``, keyword inputs too; or a tensor, tuple or dict as ``forward`` takes it), its first
    sample repeated along the model's batch dimension. ``float_model`` is moved to the CPU (pass a copy);
    ``quant`` is copied there when it is elsewhere."""
    out: dict[str, Any] = {}
    if not isinstance(example, ForwardCall):  # a tensor, a tuple of positional inputs, a dict of keyword inputs
        example = ForwardCall(*split_call(example))
    float_model = example.network(float_model).to("cpu")  # the caller's own float copy
    if device_of(quant).type != "cpu":
        quant = detached_copy(quant).to("cpu")  # a copy: the converted model stays on its device
    quant = example.network(quant)
    example = example.to("cpu")
    batch_dim = input_batch_dim(float_model, example.args, example.kwargs)  # 1: sequence-first inputs
    variants = {"eager": (float_model, quant)}
    if latency == "both":
        variants["compiled"] = (compile_for_cpu(float_model), compile_for_cpu(quant))
    warnings = []
    for name, (f, q) in variants.items():
        try:
            res = measure_latency(
                {"float": f, "quantized": q}, example, batch_size=64, batch_dim=batch_dim, repeats=9, warmup=3, num_threads=1, iters=None
            )  # one thread, as the report: a second one time-sliced with other jobs read 0.12x where it was 1.24x
        except Exception as err:  # noqa: BLE001 - a backend that cannot compile is reported, not fatal
            out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            warnings.append(
                f"QuantizeCallback: the {name} latency check (float vs converted at batch 64) failed, so the report "
                f"has no {name} latency: {out[name]['error']}"
            )
            continue
        speedup = res["float"]["median_ms"] / res["quantized"]["median_ms"]
        out[name] = {"batch": 64, **{f"{k}_ms": v["median_ms"] for k, v in res.items()}, "speedup": speedup}
    eager = out.get("eager", {}).get("speedup")
    compiled = out.get("compiled", {}).get("speedup")
    if eager is not None and eager < 1.0:
        warnings.append(
            "QuantizeCallback: the converted model is slower than float on CPU in eager mode "
            f"({eager:.2f}x speed at batch 64, in this callback's own check; the report times at its batch_size)"
            f"{_slow_hint(compiled, formats)}"
        )
    elif compiled is not None and compiled < 1.0:
        warnings.append(f"QuantizeCallback: compiled for CPU, the converted model is slower than float ({compiled:.2f}x)")
    return out, warnings


def _slow_hint(compiled: float | None, formats: set[str]) -> str:
    """What to tell a user whose converted model is slower than float in eager mode."""
    if compiled is not None:
        if compiled >= 1.0:
            return (f"; compiled for CPU it is {compiled:.2f}x float, so run it as "
                    "lightning_compress.compile_for_cpu(callback.quantized_model), or serve it as a package "
                    "from lightning_compress.export_for_cpu (faster still)")
        return (f"; compiled for CPU it is slower too ({compiled:.2f}x float): for this model float stays the faster "
                "choice, or serve a package from lightning_compress.export_for_cpu and time it")
    if formats & {"int8_linear", "torchao_int8_dynamic"}:
        return ("; the int8 Linear path is fast under lightning_compress.compile_for_cpu(callback.quantized_model) "
                "(latency='both' measures it) and in lightning_compress.export_for_cpu packages")
    return ("; its layers are weight-only or low-bit: they store integers but compute in float (smaller, "
            "not faster); Linear layers with 8-bit inputs (activation_bits=8) get int8 kernels")


def write_files(
    quantized: nn.Module,
    directory: Path,
    save_to: str | None,
    export_to: str | None,
    example: ForwardCall | None,
    dynamic_sequence: bool = False,
    onnx_tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """``save_to`` (a :func:`save_quantized` file) and ``export_to`` (an :func:`export` artifact, its kind by
    the suffix), relative to ``directory``; a failed export is a warning (training has finished), in
    ``"warnings"``.

    ``example`` is the whole call the training step makes (every positional and keyword input, such as an
    attention mask; :func:`~lightning_compress.plugin.example_input` with ``full=True``): the package takes
    those inputs, its batch dimension (read from the model, 1 for sequence-first inputs) of any size, and with
    ``dynamic_sequence`` their sequence length too, within the range ``torch.export`` finds."""
    out: dict[str, Any] = {}
    if save_to:
        path = directory / save_to  # an absolute save_to stays itself
        path.parent.mkdir(parents=True, exist_ok=True)
        save_quantized(quantized, path)
        size = path.stat().st_size
        out["saved_to"] = {"path": str(path), "bytes": size}
        rank_zero_info(f"QuantizeCallback: converted model saved to {path} ({size:,} bytes)")
    if not export_to:
        return out
    path = directory / export_to
    try:
        if example is None:
            raise ValueError("no example input: set example_input_array on the LightningModule")
        written = export(example.network(quantized), path, example.to("cpu"), dynamic_sequence=dynamic_sequence,
                         onnx_tolerance=onnx_tolerance)
    except Exception as err:  # noqa: BLE001 - the trained model and its checkpoint stand; say what failed
        msg = f"QuantizeCallback: export_to={export_to!r} not written: {type(err).__name__}: {err}"[:600]
        out["warnings"] = [msg]
        rank_zero_warn(msg)
        return out
    out["exported_to"] = {"path": str(path), "format": written["format"], "bytes": path.stat().st_size}
    rank_zero_info(f"QuantizeCallback: {written['format']} artifact exported to {path} (load it with lightning_compress.load)")
    return out


def check_export_call(trainer: Trainer, pl_module: LightningModule, n_layers: int, export_to: str) -> None:
    """``export_to`` writes the network with the call the training step makes, and an artifact takes tensors: a call
    with a dict or a list (``forward(self, batch)``) is refused before training, not warned about after it. A call
    that cannot be found yet is left to the end of the fit, which says so.

    Raises:
        ValueError: naming ``export_to``, the call's non-tensor input and the ways out.
    """
    from lightning_compress.capture import example_call_parts

    call = example_input(trainer, pl_module, full=True)
    if call is None:
        return
    _, call = network_and_call(pl_module, n_layers, call)
    try:
        example_call_parts(call)
    except TypeError as err:
        raise ValueError(
            f"QuantizeCallback: export_to={export_to!r} cannot be written: the training step calls the network with "
            f"inputs an artifact cannot take ({err}). Give forward tensors (forward(self, x), called as "
            "self(batch['x'])), set example_input_array to the tensors it takes, or leave export_to out (save_to "
            "takes any network)"
        ) from err


def convert_at_fit_end(
    trainer: Trainer, pl_module: LightningModule, layers: dict[str, nn.Module], opts: QuantizeOptions, report: dict[str, Any]
) -> tuple[nn.Module | None, ForwardCall | None]:
    """The converted copy of the trained network and the call the training step makes (``None`` when it
    cannot be found), with the copy's sizes and latency next to float recorded in ``report``; the module itself
    is unchanged. :func:`write_at_fit_end` then writes the files. Of a network sharded by FSDP2: converted and
    measured on rank 0 (every rank must call this), ``None`` elsewhere."""
    check_quantization_finite(layers, "QuantizeCallback conversion at the end of fit", opts.on_nonfinite)
    # the call the step makes (keyword inputs too), for the latency check and the package: found on every rank,
    # since finding it may run the step, whose forward on a sharded module gathers from every rank;
    # it also says which network the step calls: the module's forward, or a child (`self.model(x)`)
    example = example_input(trainer, pl_module, full=True)
    network, example = network_and_call(pl_module, len(layers), example)
    whole = detached_copy(uncompiled(network))
    if whole is None:  # sharded by FSDP2: rank 0 gathered the network, and converts, measures and writes it
        return None, example
    float_model = float_copy(whole)
    quantized = convert_fake_quant(whole, backend=opts.backend, inplace=True, on_nonfinite=None)  # checked above
    report.update(sizes(float_model, quantized))
    report["formats"] = {k: v["format"] for k, v in quantized.quantization_spec.items()}
    if example is not None and opts.latency != "none" and trainer.is_global_zero:
        speed, slow = measure_speed(float_model.eval(), quantized, example, opts.latency, set(report["formats"].values()))
        report["latency"] = speed
        for msg in slow:
            report.setdefault("warnings", []).append(msg)
            rank_zero_warn(msg)
    return quantized, example


def write_at_fit_end(
    trainer: Trainer, quantized: nn.Module | None, example: ForwardCall | None, opts: QuantizeOptions, report: dict[str, Any]
) -> None:
    """The files ``save_to``/``export_to`` ask for (:func:`write_files`), recorded in ``report``. Every rank
    calls this (the run's folder is broadcast); rank 0 writes ``quantized``."""
    if not (opts.save_to or opts.export_to):
        return
    directory = run_dir(trainer)  # on every rank: trainer.log_dir broadcasts
    if trainer.is_global_zero and quantized is not None:
        written = write_files(
            quantized, directory, opts.save_to, opts.export_to, example, opts.export_dynamic_sequence, opts.onnx_tolerance
        )
        report.setdefault("warnings", []).extend(written.pop("warnings", []))
        report.update(written)
