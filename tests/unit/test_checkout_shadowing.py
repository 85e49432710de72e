"""A source checkout on sys.path must not shadow the PyPI package named `kernels`
(transformers >= 5.25 imports it): the checkout's kernels/ folder hands that name over."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_kernels(extra_dir: Path | None) -> subprocess.CompletedProcess:
    path = [str(ROOT)] + ([str(extra_dir)] if extra_dir else [])
    code = (
        f"import sys; sys.path[:0] = {path!r}; import kernels; "
        "print(kernels.__file__); print(getattr(kernels, 'MARK', None))"
    )
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_checkout_first_on_path_yields_the_installed_package(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'pypi'\nfrom kernels.sub import VALUE\n")
    (fake / "sub.py").write_text("VALUE = 3\n")
    out = _import_kernels(tmp_path / "site")
    assert out.returncode == 0, out.stderr
    file, mark = out.stdout.split()
    assert Path(file).resolve() == (fake / "__init__.py").resolve()
    assert mark == "pypi"


def test_without_the_package_the_error_is_one_line_and_names_moeflow_kernels():
    out = _import_kernels(None)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "moeflow.kernels" in last
