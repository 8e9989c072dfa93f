"""Packaging: `pip wheel .` and a plain (non-editable) `pip install .` build the C++ kernels, and the installed
package runs them, away from the source tree.

The wheel build compiles csrc/ into ./build; the install that follows reuses those objects (ninja), so the
pair costs one compile.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

# Run from a directory without the sources, against the installed copy only.
CHECK_INSTALLED = """
import sys, torch
import transxnet, transxnet_kernels
assert transxnet_kernels.__file__.startswith(sys.argv[1]), transxnet_kernels.__file__
status = transxnet_kernels.available_backends()["cpp"]
assert status.startswith("available"), status
model = transxnet.accelerated(transxnet.TransXNet("t")).eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
print("installed package OK:", status)
"""


@pytest.mark.slow
def test_wheel_and_plain_install_build_the_cpp_kernels(tmp_path):
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop("TRANSXNET_NO_CPP", None)
    wheels = tmp_path / "wheels"
    subprocess.run(
        PIP + ["wheel", ".", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    (wheel,) = wheels.glob("transxnet_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("transxnet_kernels/_C.") and n.endswith(".so") for n in names), names
    for module in (
        "transxnet/model.py",
        "transxnet/timm_models.py",
        "transxnet_kernels/cpp/ops.py",
        "transxnet_kernels/triton/idconv.py",
    ):
        assert module in names

    site = tmp_path / "site"
    subprocess.run(
        PIP + ["install", ".", "--no-build-isolation", "--no-deps", "-q", "--target", str(site)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    run_env = {**env, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK_INSTALLED, str(site)],
        cwd=tmp_path,
        env=run_env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "installed package OK" in out.stdout
