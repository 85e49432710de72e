"""moeflow.kernels: Triton kernels for the experts (grouped GEMM with fused permute).

Installed as ``moeflow.kernels``. When a source checkout is on ``sys.path`` (``python -m`` or
pytest from the repository root) this folder is also visible as top-level ``kernels``, the
name of the PyPI package transformers >= 5.25 imports; under that name the import is handed
to the real package, so a checkout never breaks transformers.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "No module named 'kernels': moeflow's kernels/ folder is imported as moeflow.kernels",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns whatever sits here
    _spec.loader.exec_module(_module)
