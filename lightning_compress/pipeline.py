"""The whole seed in one command: train a teacher, distil a student from it while pruning and then
quantising the student, print the report, export the compact artifact.

Two plain LightningCLI runs chained by the teacher's checkpoint:

1. ``fit`` with the teacher's config; its best checkpoint (or its last one) is the teacher;
2. ``fit`` with the student's config (a :class:`~lightning_compress.DistillationModule` with the
   pruning and quantisation callbacks), given ``--model.init_args.teacher_ckpt=<that checkpoint>``;
3. the int8 student (``QuantizeCallback.quantized_model``, else the student) written with
   :func:`lightning_compress.export` (a compact artifact by default; ``--export-to student.onnx`` an ONNX file).

    lightning-compress pipeline --teacher configs/teacher.yaml --student configs/pipeline.yaml

Arguments after ``--teacher-args`` / ``--student-args`` go to that stage's CLI unchanged (e.g.
``--student-args --trainer.max_epochs=4``); the pipeline's own options among them, and a ``teacher_ckpt`` given to
the student stage (it would replace the teacher stage's checkpoint), are refused. Before the teacher trains, both
command lines are parsed and the student stage's callbacks built, and its model class, DistillationModule options,
this library's data modules, report folder and the artifact path are checked (a project's own data module and the
model itself are built only in their stage). Under ``strategy=ddp`` every process runs both stages and
writes the same artifact (rank 0's file; the others write beside it with their rank in the name).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_compress._files import check_writable
from lightning_compress.cli import EXTRA_SUBCOMMANDS, check_command, cli_main, command_parser, console_main, settings_checked
from lightning_compress.deploy import ONNX_TOLERANCE, check_export_path, check_onnx_tolerance, export

__all__ = ["EXTRA_SUBCOMMANDS", "console_main", "run_pipeline"]  # the command's entry point, where it was first


def _teacher_checkpoint(trainer: Any) -> str:
    callback = trainer.checkpoint_callback
    path = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
    if not path or not Path(path).is_file():
        raise ValueError(
            "the teacher stage wrote no checkpoint: keep checkpointing on in its config (enable_checkpointing: true, "
            "or a ModelCheckpoint callback)"
        )
    return path


def _no_checkpoint_reason(config: Any) -> str | None:
    """Why a parsed fit config writes no checkpoint the student stage could read, else ``None``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_compress.tuning.config import builds_class

    callbacks = config.trainer.callbacks or []
    checkpoints = [
        getattr(entry, "init_args", None) or {} for entry in (callbacks if isinstance(callbacks, list) else [callbacks])
        if builds_class(entry, (ModelCheckpoint,))
    ]
    if not checkpoints and config.trainer.enable_checkpointing is False:
        return "enable_checkpointing is false and no ModelCheckpoint is given"
    first = checkpoints[0] if checkpoints else {}  # the one Lightning's trainer.checkpoint_callback is, which is read
    if checkpoints and first.get("save_top_k", 1) == 0 and not first.get("save_last"):
        return "its (first) ModelCheckpoint saves nothing (save_top_k: 0 without save_last)"
    return None


def _check_stages(teacher_config: Any, student_config: Any) -> None:
    """Refuse, before the teacher trains, a teacher stage that would write no checkpoint, a student stage whose
    model takes no teacher checkpoint, and a DistillationModule option or a data module its constructor would refuse."""
    from lightning_compress.cli import CommandError
    from lightning_compress.tuning.config import class_of, expected_base

    if (reason := _no_checkpoint_reason(teacher_config)) is not None:
        raise CommandError(f"the teacher stage would write no checkpoint for the student stage: {reason}; keep one")
    from lightning_compress.distillation import DistillationModule

    model = str(getattr(student_config.model, "class_path", ""))
    try:
        cls = class_of(model, expected_base(("model",)))
        parameters = inspect.signature(cls).parameters.values()
        takes = issubclass(cls, DistillationModule) or any(p.name == "teacher_ckpt" or p.kind is p.VAR_KEYWORD for p in parameters)
    except (ValueError, TypeError):
        cls, takes = None, True  # a class the parser resolved otherwise: its own error says what is wrong
    if not takes:
        raise CommandError(
            f"the student stage's model {model} takes no teacher_ckpt: the pipeline distils, so its student config needs "
            "model.class_path: lightning_compress.DistillationModule (see configs/pipeline.yaml); fit a plain config "
            "with lightning-compress fit --config"
        )
    if cls is DistillationModule:
        _check_distillation_options(getattr(student_config.model, "init_args", None))
    _check_own_data_module(student_config)
    _check_report_folders(student_config)


def _check_report_folders(config: Any) -> None:
    """A :class:`~lightning_compress.CompressionReport` ``dirpath`` of the student stage that cannot be written, refused
    before the teacher trains (the report's own check, in its ``setup``, would come after the teacher's fit)."""
    from lightning_compress.cli import CommandError
    from lightning_compress.report import CompressionReport
    from lightning_compress.tuning.config import builds_class

    callbacks = getattr(getattr(config, "trainer", None), "callbacks", None) or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        dirpath = (getattr(entry, "init_args", None) or {}).get("dirpath") if builds_class(entry, (CompressionReport,)) else None
        if dirpath:
            try:
                check_writable(dirpath, "CompressionReport: dirpath", folder=True, make=False)
            except ValueError as err:
                raise CommandError(f"the student stage's {err}") from err


def _check_own_data_module(config: Any) -> None:
    """Build the student stage's data module before the teacher trains when it is one of this library's, whose
    constructors check their options and files and load nothing (a missing MNIST folder fails now, not after the
    teacher's fit). A project's own data module may download or read in its constructor, so it is left to its stage."""
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    from lightning_compress.cli import CommandError

    data = getattr(config, "data", None)
    class_path = str(getattr(data, "class_path", ""))
    init_args = getattr(data, "init_args", None)
    options = dict(vars(init_args)) if isinstance(init_args, Namespace) else {}
    if not class_path.startswith("lightning_compress.") or any(isinstance(v, (Namespace, dict)) for v in options.values()):
        return
    try:
        instantiate_class((), {"class_path": class_path, "init_args": options})
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise CommandError(f"{class_path.rsplit('.', 1)[-1]}: {err}") from err


def _check_distillation_options(init_args: Any) -> None:
    """The student's :class:`~lightning_compress.DistillationModule` options that need no network, checked as its
    constructor checks them (a ``-1`` temperature, an unknown loss name): the module is built only after the teacher
    stage, which would otherwise train first. Options given as classes (an optimizer, a loss object) are left to
    the constructor."""
    from jsonargparse import Namespace

    from lightning_compress.cli import CommandError
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.distillation.options import model_free_options

    given = dict(vars(init_args)) if isinstance(init_args, Namespace) else dict(init_args or {})
    defaults = inspect.signature(DistillationModule).parameters
    options = {}
    for name in inspect.signature(model_free_options).parameters:
        value = given.get(name, defaults[name].default)
        options[name] = defaults[name].default if isinstance(value, Namespace) else value
    try:
        model_free_options(**options)
    except (ValueError, TypeError) as err:
        raise CommandError(f"DistillationModule: {err}") from err


def _artifact_path(path: str, rank: int) -> str:
    if rank == 0:
        return path
    p = Path(path)
    return os.fspath(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


def _check_settings(
    teacher_config: str | os.PathLike[str], student_config: str | os.PathLike[str], onnx_tolerance: float, export_to: str | None
) -> None:
    check_onnx_tolerance(onnx_tolerance)
    if export_to:  # a path export would refuse, or could not write, after both stages trained
        check_export_path(export_to)
        check_writable(export_to, "--export-to", make=False)  # its folder is made when it is written
    for config in (teacher_config, student_config):
        if not Path(config).is_file():
            raise FileNotFoundError(f"no config at {os.fspath(config)!r}")


def _parsed(stage: str, config: str | os.PathLike[str], args: Sequence[str], own: Sequence[str] = ()) -> Any:
    """The stage's ``fit`` command line parsed (:func:`~lightning_compress.cli.check_command`), with the pipeline's
    ``own`` arguments before the user's ``args``; where the parser refuses it (its usage and error printed, naming
    neither stage), a last line says which stage's config it was."""
    try:
        return check_command(["fit", "--config", os.fspath(config), *own, *args])
    except SystemExit as stopped:
        if stopped.code not in (0, None):
            line = " ".join(["--config", os.fspath(config), *args])
            print(f"lightning-compress pipeline: the {stage} stage's command line ({line}) does not parse: the error "
                  "above; nothing has trained", file=sys.stderr)
        raise


#: What the student stage is parsed with before the teacher's checkpoint exists.
_TEACHER_TO_COME = "<the teacher stage's checkpoint>"


def _check_teacher_kept(student_config: Any) -> None:
    """Refuse student arguments that replace the teacher checkpoint the pipeline passes (in any form the parser reads:
    ``--model.init_args.teacher_ckpt=...``, ``--model.init_args='{"teacher_ckpt": ...}'``, another ``--config``): the
    student would distil from another teacher than the one just trained, in silence."""
    from lightning_compress.cli import CommandError

    given = getattr(getattr(getattr(student_config, "model", None), "init_args", None), "teacher_ckpt", _TEACHER_TO_COME)
    if given != _TEACHER_TO_COME:
        raise CommandError(
            f"the student stage's arguments set teacher_ckpt={given!r}, which would replace the checkpoint the teacher "
            "stage writes (the pipeline passes it); drop it (to distil from a teacher you have, run lightning-compress "
            "fit --config <student config> --model.init_args.teacher_ckpt=<checkpoint>)"
        )


#: The pipeline's own options: a stage's LightningCLI has none of them.
OWN_OPTIONS = ("--teacher", "--student", "--export-to", "--onnx-tolerance")


def _check_stage_args(teacher_args: Sequence[str], student_args: Sequence[str]) -> None:
    """Refuse, before anything trains, one of the pipeline's own options among a stage's arguments (everything after
    ``--student-args`` goes to the student stage)."""
    for stage, args in (("teacher", teacher_args), ("student", student_args)):
        for arg in args:
            flag = str(arg).partition("=")[0]
            if flag in OWN_OPTIONS:
                raise ValueError(
                    f"{flag} is among the {stage} stage's arguments (everything after --{stage}-args goes to that stage's "
                    f"LightningCLI, which has no {flag}); give the pipeline's own options before --teacher-args and --student-args"
                )


def run_pipeline(
    teacher_config: str | os.PathLike[str],
    student_config: str | os.PathLike[str],
    *,
    teacher_args: Sequence[str] = (),
    student_args: Sequence[str] = (),
    export_to: str | None = "runs/pipeline/student.safetensors",
    onnx_tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Run the teacher stage, then the student stage, then export; returns what each produced.

    ``export_to``'s suffix picks the artifact (:func:`lightning_compress.export`): ``.onnx`` an ONNX file
    checked in onnxruntime within ``onnx_tolerance``, ``.pt2`` a CPU package, any other a compact artifact.

    Returns:
        ``{"teacher_ckpt", "teacher_metrics", "student_metrics", "model", "artifact"}``: ``model`` is the
        compressed student (the int8 model when the student stage quantises), ``artifact`` what
        :func:`lightning_compress.export` returned (``None`` with ``export_to=None``).

    Raises:
        FileNotFoundError: a config file is missing (before anything trains).
        SystemExit: a stage's config or arguments do not parse (the parser's usage and error printed, then which
            stage; before anything trains).
        ValueError, TypeError: a callback refuses an option, or a check above fails (before anything trains).
        ValueError: the teacher stage wrote no checkpoint.
    """
    from lightning_compress.quantization.callback import QuantizeCallback

    _check_settings(teacher_config, student_config, onnx_tolerance, export_to)  # before anything trains
    _check_stage_args(teacher_args, student_args)
    # both command lines parse (and their callbacks build) before the teacher trains: a typo in the student's
    # config is an error now, not after the teacher stage
    teacher_parsed = _parsed("teacher", teacher_config, teacher_args)
    # the student's command line as it will run, the teacher's checkpoint (not yet written) where the pipeline puts it
    student_parsed = _parsed("student", student_config, student_args, own=[f"--model.init_args.teacher_ckpt={_TEACHER_TO_COME}"])
    _check_teacher_kept(student_parsed)
    _check_stages(teacher_parsed, student_parsed)
    teacher = cli_main(["fit", "--config", os.fspath(teacher_config), *teacher_args])
    ckpt = _teacher_checkpoint(teacher.trainer)
    student = cli_main(["fit", "--config", os.fspath(student_config), f"--model.init_args.teacher_ckpt={ckpt}", *student_args])
    result: dict[str, Any] = {
        "teacher_ckpt": ckpt,
        "teacher_metrics": {k: float(v) for k, v in teacher.trainer.callback_metrics.items()},
        "student_metrics": {k: float(v) for k, v in student.trainer.callback_metrics.items()},
        "artifact": None,
    }
    quant = next((c for c in student.trainer.callbacks if isinstance(c, QuantizeCallback)), None)
    # the student: the distillation module's, or a module of the user's that distils itself
    model = quant.quantized_model if quant is not None and quant.quantized_model is not None else getattr(student.model, "student", student.model)
    result["model"] = model
    if export_to:
        example = getattr(student.model, "example_input_array", None)
        if example is None:
            raise ValueError("the student stage's module has no example_input_array; set example_input_shape to export")
        path = _artifact_path(export_to, student.trainer.global_rank)
        result["artifact"] = export(model, path, example, onnx_tolerance=onnx_tolerance)
        if student.trainer.is_global_zero:
            print(f"exported the compressed student: {result['artifact']['path']} ({result['artifact']['bytes']:,} bytes)")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-compress pipeline``."""
    parser = command_parser("lightning-compress pipeline", __doc__)
    parser.add_argument("--teacher", default="configs/teacher.yaml", help="LightningCLI config of the teacher's fit")
    parser.add_argument("--student", default="configs/pipeline.yaml", help="LightningCLI config of the student's fit")
    parser.add_argument(
        "--export-to", default="runs/pipeline/student.safetensors",
        help="artifact of the result, its kind by the suffix: .onnx, .pt2, else compact ('' to skip)",
    )
    parser.add_argument("--onnx-tolerance", type=float, default=ONNX_TOLERANCE,
                        help="a .onnx export: how far onnxruntime may be from PyTorch, as a fraction of the largest output")
    parser.add_argument("--teacher-args", nargs="*", default=[], help="everything up to --student-args: the teacher's CLI")
    parser.add_argument("--student-args", nargs="*", default=[], help="everything after it: the student's CLI")
    argv = list(argv) if argv is not None else []
    stages: dict[str, list[str]] = {"--teacher-args": [], "--student-args": []}
    own, current = [], None
    for arg in argv:  # stage arguments start with "--" themselves: split them off before parsing
        flag, equals, value = arg.partition("=")
        if flag in stages and equals:  # --teacher-args=--trainer.max_epochs=1: one stage argument
            if value:
                stages[flag].append(value)
            current = flag
        elif arg in stages:
            current = arg
        elif current is None:
            own.append(arg)
        else:
            stages[current].append(arg)
    args = parser.parse_args(own)
    with settings_checked():  # the command's own settings: one line, as the stages' refusals are
        _check_settings(args.teacher, args.student, args.onnx_tolerance, args.export_to or None)
        _check_stage_args(stages["--teacher-args"], stages["--student-args"])
    return run_pipeline(
        args.teacher,
        args.student,
        teacher_args=stages["--teacher-args"],
        student_args=stages["--student-args"],
        export_to=args.export_to or None,
        onnx_tolerance=args.onnx_tolerance,
    )

