"""Declares the Cython extensions of ezengine_core; all other metadata is in pyproject.toml."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# -O3 for the search and sum-tree loops. -ffp-contract=off keeps IEEE rounding identical to
# the pure-Python reference search (no fused multiply-add), so the differential tests can
# compare visit counts exactly.
COMPILE_ARGS = ["-O3", "-ffp-contract=off"]

extensions = [
    Extension(
        f"ezengine_core.{name}",
        [f"ezengine_core/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    )
    for name in ("mcts", "sumtree")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
