"""Shared fixtures of the CPU kernel tests: the C++ library must build, and a test runs once per code
path the kernel has (skipped where this CPU or ATEN_CPU_CAPABILITY lacks it)."""

import pytest

from torchao_mx_ext.kernels import cpu_extension


def kernel_path_fixtures(set_isa, names):
    """``(kernel, isa)`` fixtures for a kernel module's ``set_isa`` hook and its path names
    (``{level: name}``): ``kernel`` (module scope, autouse) fails the module if the library did not
    build and restores the best path afterwards; ``isa`` runs a test on each path in turn."""

    @pytest.fixture(scope="module", autouse=True)
    def kernel():
        if not cpu_extension.is_available():
            pytest.fail("the CPU MXFP4 kernels did not build (see the logged warning): they need g++ and ninja")
        yield
        set_isa(None)

    @pytest.fixture(params=list(names), ids=names.get)
    def isa(request):
        if request.param > set_isa(None):
            pytest.skip(f"this CPU (or ATEN_CPU_CAPABILITY) has no {names[request.param]} path")
        assert set_isa(request.param) == request.param
        yield request.param
        set_isa(None)

    return kernel, isa
