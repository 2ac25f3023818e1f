"""Builds the collector's span decoder, a C extension, with the wheel.

The collector decodes spans in C when it can (``src/atoll/observability/collector/
_native.c``; why, in that file and in ``docs/benchmarks.md``) and in Python otherwise, so
a build without a C compiler still works: it warns and leaves the extension out, unless
``ATOLL_REQUIRE_NATIVE=1`` makes that an error. ``ATOLL_NO_NATIVE=1`` skips it.

A wheel gets the compiled module and a platform tag; an editable install (``pip install
-e``, as ``make install`` does) gets it next to its source, where the import finds it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/atoll/observability/collector/_native.c")
PACKAGE_DIR = "atoll/observability/collector"


class NativeExtensionHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compiles ``_native.c`` for the running interpreter."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("ATOLL_NO_NATIVE"):
            return
        source = Path(self.root) / SOURCE
        name = "_native" + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        if version == "editable":
            target = source.parent / name
        else:
            self._temp = tempfile.mkdtemp(prefix="atoll-native-")
            target = Path(self._temp) / name
        if not self._compile(source, target):
            return
        if version != "editable":
            build_data["force_include"][str(target)] = f"{PACKAGE_DIR}/{name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:  # noqa: ARG002 - the hook interface
        temp = getattr(self, "_temp", None)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    def _compile(self, source: Path, target: Path) -> bool:
        linker = shlex.split(str(sysconfig.get_config_var("LDSHARED") or "cc -shared"))
        include = sysconfig.get_paths()["include"]
        command = [
            *linker,
            "-O2",
            "-fPIC",
            "-fwrapv",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            f"-I{include}",
            str(source),
            "-o",
            str(target),
        ]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)  # noqa: S603 - our own command
        except (OSError, subprocess.CalledProcessError) as exc:
            output = getattr(exc, "stderr", "") or str(exc)
            message = f"atoll: the C span decoder was not built ({' '.join(command)}):\n{output}"
            if os.environ.get("ATOLL_REQUIRE_NATIVE"):
                raise RuntimeError(message) from exc
            # A build tool shows what a build hook writes to stderr; there is no logger.
            print(f"{message}\natoll: the collector will decode spans in Python", file=sys.stderr)  # noqa: T201
            return False
        return True
