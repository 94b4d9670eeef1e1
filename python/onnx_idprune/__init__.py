"""onnx-idprune from Python: the same pass as the ``onnx-idprune`` command.

Each function builds the command line's own arguments from its keyword
arguments and runs them in this process, so values, flag combinations and
failures are those of the command: a failure raises :class:`Error` with the
command's one-line message and exit code.

>>> import onnx_idprune
>>> report = onnx_idprune.prune("clip.onnx", "clip-pruned.onnx",
...                             calib="calib.npz", keep_params=0.5)
>>> report["params"]["blocks"]

ONNX Runtime comes from the ``onnxruntime`` wheel this package depends on;
``ort_lib=`` (``--ort-lib``) or ``ORT_DYLIB_PATH`` choose another library.
Progress bars are off unless a call passes ``progress=True`` (and stderr is
a terminal). A job runs to its end once started: Ctrl-C is seen when the call
returns, and the output is then complete or absent, never partial.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import util as _importlib_util
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from . import _native

__all__ = ["Error", "prune", "apply_plan", "inspect", "intrinsic_dimension"]

PathLike = Union[str, "os.PathLike[str]"]


class Error(Exception):
    """A call that failed: ``message`` is the command's one line (without
    the ``onnx-idprune:`` prefix) and ``code`` its exit code (1 bad input or
    error, 2 usage, 3 fidelity gate not met)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message = message
        self.code = code


def _onnxruntime_library() -> Optional[str]:
    """The shared library inside the installed ``onnxruntime`` wheel, found
    without importing it (the import would load a second copy of the
    Python bindings for nothing)."""
    spec = _importlib_util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        capi = Path(location) / "capi"
        # Linux: libonnxruntime.so.1.x.y; macOS: libonnxruntime.1.x.y.dylib.
        found = sorted(capi.glob("libonnxruntime.so.*")) + sorted(
            capi.glob("libonnxruntime.*.dylib")
        )
        found = [p for p in found if p.is_file()]
        if found:
            return str(found[0])
    return None


_native.set_host_library(_onnxruntime_library())


def _call(function, *args):
    try:
        return function(*args)
    except _native.NativeFailure as failure:
        message, code = failure.args
        raise Error(message, code) from None


def _flags(options: Mapping[str, Any]) -> list[str]:
    """Keyword arguments as command-line flags: ``keep_params=0.5`` is
    ``--keep-params 0.5``, ``True`` a bare flag, ``None``/``False`` absent."""
    out: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        else:
            out += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return out


class _ModelPath:
    """A model argument as a path: paths pass through; an ``onnx.ModelProto``
    (with its weights in memory, under 2 GiB) is written to a private
    temporary folder for the call and removed after it."""

    def __init__(self, model: Any):
        self._model = model
        self._folder: Optional[tempfile.TemporaryDirectory] = None

    def __enter__(self) -> str:
        if isinstance(self._model, (str, os.PathLike)):
            return os.fspath(self._model)
        serialize = getattr(self._model, "SerializeToString", None)
        if serialize is None:
            raise Error(
                f"a model is a path or an onnx.ModelProto, not {type(self._model).__name__}", 1
            )
        self._folder = tempfile.TemporaryDirectory(prefix="onnx-idprune-")
        path = os.path.join(self._folder.name, "model.onnx")
        with open(path, "wb") as f:
            f.write(serialize())
        return path

    def __exit__(self, *exc) -> None:
        if self._folder is not None:
            self._folder.cleanup()


def _plan_json(plan: Any) -> Optional[str]:
    """A plan given as a dict travels in memory; a path is read by the
    command as ``--plan FILE``."""
    if isinstance(plan, Mapping):
        return json.dumps(plan)
    return None


def prune(
    input: Any,
    output: PathLike,
    *,
    calib: Optional[PathLike] = None,
    images: Optional[PathLike] = None,
    texts: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
    preprocessor: Optional[PathLike] = None,
    keep_params: Optional[float] = None,
    vision_keep: Optional[float] = None,
    text_keep: Optional[float] = None,
    mode: Optional[str] = None,
    repair: Optional[str] = None,
    sparsity: Optional[float] = None,
    score: Optional[str] = None,
    sensitivity: bool = False,
    samples: Optional[int] = None,
    holdout: Optional[int] = None,
    pooling: Optional[str] = None,
    variant: Optional[str] = None,
    min_fidelity: Optional[float] = None,
    plan: Any = None,
    plan_out: Optional[PathLike] = None,
    report: Optional[PathLike] = None,
    external_data: Optional[str] = None,
    max_memory: Optional[Union[int, str]] = None,
    ep: Optional[str] = None,
    allow_fallback: bool = False,
    ort_lib: Optional[PathLike] = None,
    progress: bool = False,
) -> dict:
    """The main job: prune ``input`` (a path or an ``onnx.ModelProto``) into
    ``output`` and return the run's report (what ``--report FILE`` writes as
    JSON, and writes too when ``report`` is given). Each keyword is the
    command's flag of the same name; ``plan`` is a path or the plan itself
    (a dict)."""
    options = dict(locals())
    for positional in ("input", "output", "plan", "progress"):
        options.pop(positional)
    plan_json = _plan_json(plan)
    if plan is not None and plan_json is None:
        options["plan"] = plan
    with _ModelPath(input) as model:
        args = [model, os.fspath(output)] + _flags(options)
        text = _call(_native.prune, args, plan_json, progress)
    return json.loads(text)


def apply_plan(
    input: Any,
    output: PathLike,
    plan: Any,
    *,
    calib: Optional[PathLike] = None,
    images: Optional[PathLike] = None,
    texts: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
    preprocessor: Optional[PathLike] = None,
    plan_out: Optional[PathLike] = None,
    report: Optional[PathLike] = None,
    external_data: Optional[str] = None,
    ep: Optional[str] = None,
    allow_fallback: bool = False,
    ort_lib: Optional[PathLike] = None,
    progress: bool = False,
) -> dict:
    """Applies ``plan`` (a path, or a plan dict as ``plan_out``/the report's
    ``plan`` gives it) exactly, as ``onnx-idprune IN OUT --plan FILE``; a plan
    that records a least-squares repair needs its calibration data again.
    Returns the report."""
    if plan is None:
        raise Error("apply_plan: give a plan (a path or a dict)", 1)
    options = dict(locals())
    for positional in ("input", "output", "plan", "progress"):
        options.pop(positional)
    plan_json = _plan_json(plan)
    if plan_json is None:
        options["plan"] = plan
    with _ModelPath(input) as model:
        args = [model, os.fspath(output)] + _flags(options)
        text = _call(_native.prune, args, plan_json, progress)
    return json.loads(text)


def inspect(model: Any) -> dict:
    """The towers and transformer blocks of ``model`` (a path or an
    ``onnx.ModelProto``): what ``onnx-idprune inspect IN --json`` prints."""
    with _ModelPath(model) as path:
        text = _call(_native.inspect, ["inspect", path, "--json"])
    return json.loads(text)


def intrinsic_dimension(
    data: Any,
    *,
    estimator: Optional[str] = None,
    variant: Optional[str] = None,
    k: Optional[int] = None,
) -> dict:
    """The intrinsic dimension of a 2-D numpy array (rows = samples,
    float32, or float64 rounded to float32 as the ``.npy`` reader does),
    read in place: what ``onnx-idprune id --data X.npy --json`` prints for
    the same matrix. ``estimator`` is ``twonn`` (default) or ``mle``;
    ``variant`` is ``facco`` (default) or ``paper``; ``k`` the neighbours of
    ``mle``."""
    args = ["id", "--data", "(array)", "--json"] + _flags(
        {"estimator": estimator, "variant": variant, "k": k}
    )
    return json.loads(_call(_native.intrinsic_dimension, data, args))
