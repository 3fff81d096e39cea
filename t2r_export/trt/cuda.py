"""The only place that imports TensorRT and cuda-python, lazily, with one-line errors when either is
missing, too old, or finds no CUDA driver or GPU.

t2r-export needs TensorRT >= 10 (JetPack >= 6.1 on a Jetson): the runner binds int64 token ids,
which TensorRT 8.6 (JetPack 6.0) lacks.
"""

from __future__ import annotations

from . import TensorRTUnavailable

MIN_TENSORRT_MAJOR = 10
TENSORRT_REQUIREMENT = "TensorRT >= 10 (JetPack >= 6.1)"


def import_cudart():
    """The cuda-python runtime module, whichever layout the installed release uses."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailable("cuda-python is not installed: `pip install cuda-python` "
                                      "(or `pip install t2r-export[tensorrt]`)") from None
    return cudart


def cuda_call(result):
    """Unpack a cuda-python ``(err, *values)`` tuple; raise with CUDA's own message on error."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _device_count(cudart) -> int:
    """Visible CUDA devices; 0 when the driver reports an error.

    cuda-python < 12.9 loads libcuda on the first call and raises a bare RuntimeError ("Failed to
    dlopen libcuda.so.1") when no driver is installed; newer releases return an error code instead.
    """
    try:
        err, count = cudart.cudaGetDeviceCount()
    except (RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TensorRTUnavailable(f"no CUDA driver found ({first}): TensorRT engines are built and run on an "
                                  "NVIDIA GPU with its driver; run on such a machine, or use "
                                  "`generate --provider cpu`") from None
    return 0 if int(err) != int(cudart.cudaError_t.cudaSuccess) else int(count)


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor"); TensorRTUnavailable when no CUDA GPU is visible."""
    cudart = import_cudart()
    count = _device_count(cudart)
    if count == 0:
        raise TensorRTUnavailable("no CUDA GPU is visible (TensorRT engines are built and run on an NVIDIA GPU); "
                                  "run on a machine with one, or use `generate --provider cpu`")
    if device >= count:
        raise TensorRTUnavailable(f"CUDA device {device} does not exist ({count} visible)")
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"cannot read the TensorRT version {version!r}") from None


def check_tensorrt_version(version: str) -> None:
    """TensorRTUnavailable (one line) for a TensorRT older than 10."""
    if tensorrt_major(version) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {version} is too old: t2r-export needs {TENSORRT_REQUIREMENT}; "
                                  "upgrade JetPack or `pip install 'tensorrt>=10'`")


def import_tensorrt():
    """The ``tensorrt`` module, checked to be version 10 or later."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: `pip install t2r-export[tensorrt]` on an x86_64 "
                                  "machine with an NVIDIA GPU (on a Jetson it comes with JetPack; see "
                                  "docs/jetson.md)") from None
    check_tensorrt_version(trt.__version__)
    return trt
