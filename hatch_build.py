"""Build hook: compile the native lock-step TFTP loop (orchestrator/bootserver/_lockstep.c).

The library is plain C against libc, loaded with ctypes (see
``orchestrator/bootserver/lockstep_native.py`` for why), so building it needs only
a C compiler -- no Python headers. It is optional: without a compiler the build
says so and goes on, and the server uses its pure-Python lock-step path.
``BOOTORCH_NO_NATIVE=1`` skips it on purpose.

For an editable install (``pip install -e .``, what ``scripts/setup`` does) the
library lands next to its source, where the package is imported from; for a
wheel it is added as an artifact and the wheel is tagged for this platform.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("orchestrator/bootserver/_lockstep.c")
TARGET = SOURCE.with_suffix(".so")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]


class NativeLockstepHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        if os.environ.get("BOOTORCH_NO_NATIVE") == "1":
            self._say("BOOTORCH_NO_NATIVE=1: not building the native TFTP loop (pure Python)")
            return
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            self._say("no C compiler (install gcc): the TFTP server uses its pure-Python lock-step path")
            return
        out = root / TARGET
        tmp = out.with_suffix(".so.tmp")
        cmd = [cc, *CFLAGS, "-o", str(tmp), str(root / SOURCE)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            self._say(f"building {SOURCE} failed ({' '.join(cmd)}):\n{r.stderr}\n"
                      "the TFTP server uses its pure-Python lock-step path")
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, out)  # atomic: a running server keeps its mapped copy
        build_data["artifacts"].append(str(TARGET))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _say(self, msg: str) -> None:
        print(f"bootorch build: {msg}", file=sys.stderr)
