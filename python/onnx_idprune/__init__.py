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
a terminal; the setting is the process's, so with calls in several threads
the last one's wins). A job runs to its end once started: Ctrl-C is seen when the call
returns, and the output is then complete or absent, never partial.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import util as _importlib_util
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

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

    def __reduce__(self):
        # Both fields survive pickling (process pools send errors back).
        return (Error, (self.message, self.code))


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


def _word(value: Any) -> str:
    """A value as one command-line word: paths (str, bytes, PathLike) as the
    file system spells them, anything else by ``str``."""
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.fsdecode(os.fspath(value))
    return str(value)


def _flags(options: Mapping[str, Any]) -> list[str]:
    """Keyword arguments as command-line flags: ``keep_params=0.5`` is
    ``--keep-params=0.5`` (one word, so a value starting with ``-`` stays a
    value), ``True`` a bare flag, ``None``/``False`` absent."""
    out: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        out.append(flag if value is True else f"{flag}={_word(value)}")
    return out


class _ModelPath:
    """A model argument as a path: paths pass through; an ``onnx.ModelProto``
    (with its weights in memory, under 2 GiB) is written to a private
    temporary folder for the call and removed after it. Messages and
    reports name it ``<ModelProto>``, not the temporary file."""

    NAME = "<ModelProto>"

    def __init__(self, model: Any):
        self._model = model
        self._folder: Optional[tempfile.TemporaryDirectory] = None
        self.path: Optional[str] = None

    def __enter__(self) -> "_ModelPath":
        if isinstance(self._model, (str, bytes, os.PathLike)):
            self.path = _word(self._model)
            return self
        try:
            import onnx
        except ImportError:
            onnx = None
        if onnx is None or not isinstance(self._model, onnx.ModelProto):
            raise Error(
                f"a model is a path or an onnx.ModelProto, not {type(self._model).__name__}", 1
            )
        external = [
            t.name
            for t in self._model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        if external:
            raise Error(
                f"the ModelProto keeps {len(external)} tensors in external files (first: "
                f"'{external[0]}'); pass the model's path, or load it with its external data", 1
            )
        try:
            data = self._model.SerializeToString()
        except Exception as e:  # protobuf refuses messages over 2 GiB
            raise Error(
                f"the ModelProto cannot be serialized ({e}); save it with external data and "
                "pass the path", 1
            ) from None
        self._folder = tempfile.TemporaryDirectory(prefix="onnx-idprune-")
        self.path = os.path.join(self._folder.name, "model.onnx")
        with open(self.path, "wb") as f:
            f.write(data)
        return self

    def __exit__(self, *exc) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def call(self, function, *args):
        """``function(*args)`` with the temporary file's name replaced by
        ``<ModelProto>`` in a failure's message."""
        try:
            return _call(function, *args)
        except Error as e:
            if self._folder is None:
                raise
            raise Error(e.message.replace(self.path, self.NAME), e.code) from None

    @property
    def name(self) -> Optional[str]:
        """How the report names the model, when not by its path."""
        return self.NAME if self._folder is not None else None


def _plan_json(plan: Any) -> Optional[str]:
    """A plan given as a dict travels in memory; a path is read by the
    command as ``--plan FILE``."""
    if isinstance(plan, Mapping):
        return json.dumps(plan)
    return None


def _main_job(input: Any, output: PathLike, plan: Any, options: dict, progress: bool) -> dict:
    """The main job with ``options`` as flags: a plan dict travels in
    memory, a plan path as ``--plan``. Returns the report."""
    plan_json = _plan_json(plan)
    if plan is not None and plan_json is None:
        options["plan"] = plan
    with _ModelPath(input) as model:
        # Positionals after "--": a path starting with "-", or named like a
        # subcommand, stays a path.
        args = _flags(options) + ["--", model.path, _word(output)]
        text = model.call(_native.prune, args, plan_json, progress, model.name)
        return json.loads(text)


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
    return _main_job(input, output, plan, options, progress)


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
    return _main_job(input, output, plan, options, progress)


def inspect(model: Any) -> dict:
    """The towers and transformer blocks of ``model`` (a path or an
    ``onnx.ModelProto``): what ``onnx-idprune inspect IN --json`` prints."""
    with _ModelPath(model) as source:
        return json.loads(source.call(_native.inspect, ["inspect", "--json", "--", source.path]))


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
    args = ["id", "--data=(array)", "--json"] + _flags(
        {"estimator": estimator, "variant": variant, "k": k}
    )
    # The .npy reader takes either byte order; the native side takes the
    # machine's.
    if isinstance(data, np.ndarray) and data.dtype.kind == "f" and not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return json.loads(_call(_native.intrinsic_dimension, data, args))
