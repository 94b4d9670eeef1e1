"""What the check scripts share: an ONNX Runtime session on the CPU, and a model file's
interface (graph inputs that are not constants, and outputs, as (name, element type))."""

import onnx
import onnxruntime as ort


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def interface(path):
    graph = onnx.load(path, load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    kind = lambda v: (v.name, v.type.tensor_type.elem_type)
    return ([kind(v) for v in graph.input if v.name not in constants],
            [kind(v) for v in graph.output])
