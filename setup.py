"""Build fastrelay, with the Cython core when it can be built.

FASTRELAY_BUILD_EXTENSION selects the build, once, here:
  unset  try to compile fastrelay._core (the native primitives) and
         fastrelay._hub_c (fastrelay/hub.py, compiled through the link
         _hub_c.py and typed by _hub_c.pxd); on any failure print one line and
         build the pure-Python package (the relay then runs its Python hub);
  yes    the extension must build: a failure fails the install (CI, wheels);
  no     pure build, no compiler needed.
FASTRELAY_NO_EXTENSIONS=1 (the runtime switch) also means a pure build.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
_SWITCH = os.environ.get("FASTRELAY_BUILD_EXTENSION", "").strip().lower()
if os.environ.get("FASTRELAY_NO_EXTENSIONS"):
    _SWITCH = "no"
if _SWITCH not in ("", "yes", "no"):
    sys.exit(f"FASTRELAY_BUILD_EXTENSION must be 'yes', 'no' or unset, not {_SWITCH!r}")
MUST_BUILD = _SWITCH == "yes"
PURE = _SWITCH == "no" or sys.implementation.name != "cpython" or os.name != "posix"


class OptionalBuildExt(build_ext):
    """build_ext that degrades to a pure build unless the extension is required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)
        else:
            print("fastrelay: accelerated build (Cython core compiled)")

    @staticmethod
    def _fallback(exc: BaseException) -> None:
        if MUST_BUILD:
            raise exc
        print(
            f"fastrelay: pure build, the Cython core was not compiled ({exc.__class__.__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else 'no detail'}); "
            "the relay will run its pure-Python backend",
            file=sys.stderr,
        )


def extensions() -> list[Extension]:
    if PURE:
        print("fastrelay: pure build (FASTRELAY_BUILD_EXTENSION=no or FASTRELAY_NO_EXTENSIONS set)")
        return []
    sources = [HERE / "fastrelay" / name for name in ("_core.pyx", "_hub_c.py", "_hub_c.pxd")]
    missing = [path.name for path in sources if not path.exists()]
    if missing:
        if MUST_BUILD:
            sys.exit(f"fastrelay: FASTRELAY_BUILD_EXTENSION=yes but {', '.join(missing)} is missing")
        print(f"fastrelay: pure build, {', '.join(missing)} missing from the sources", file=sys.stderr)
        return []
    # _hub_c.py is a link to hub.py in git, but an sdist may hold a copy: the
    # compiled hub must be the same algorithm the pure backend runs.
    if (HERE / "fastrelay" / "_hub_c.py").read_bytes() != (HERE / "fastrelay" / "hub.py").read_bytes():
        sys.exit("fastrelay: fastrelay/_hub_c.py differs from fastrelay/hub.py; it must be the same file")
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        if MUST_BUILD:
            raise
        print(f"fastrelay: pure build, Cython is not installed ({exc})", file=sys.stderr)
        return []
    ext = [
        Extension("fastrelay._core", ["fastrelay/_core.pyx"], extra_compile_args=["-O3"]),
        Extension("fastrelay._hub_c", ["fastrelay/_hub_c.py"], extra_compile_args=["-O3"]),
    ]
    try:
        # hub.py's annotations are for type checkers (``i: int`` would
        # make Cython demand a Python int); _hub_c.pxd declares the C types.
        return list(cythonize(ext, language_level=3, quiet=True,
                              compiler_directives={"annotation_typing": False}))
    except Exception as exc:
        if MUST_BUILD:
            raise
        print(f"fastrelay: pure build, Cython could not translate the core ({exc})", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
