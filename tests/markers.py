"""Marks for tests that need an optional package: without it they skip and say why, instead
of erroring at import (the core package and its CPU kernels need none of them)."""

import importlib.util

import pytest

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'seqpar[gpu]'): the Triton kernels are not tested")
