"""Build the compiled ring queue and tree predict; all metadata lives in pyproject.toml."""

from __future__ import annotations

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

_DEBUG = os.environ.get("FASTSERVE_DEBUG") == "1"

_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
_compile_args = ["-O0", "-g"] if _DEBUG else ["-O3"]
_directives = {"language_level": "3"}
if _DEBUG:
    _macros.append(("CYTHON_TRACE_NOGIL", "1"))
    _directives.update(linetrace=True, binding=True)


def _extension(name: str) -> Extension:
    return Extension(
        f"fastserve.{name}",
        [f"src/fastserve/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=_macros,
        extra_compile_args=_compile_args,
    )


setup(
    ext_modules=cythonize([_extension("_queue"), _extension("_trees")], compiler_directives=_directives),
)
