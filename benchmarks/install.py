"""The ModelArts boot install (`sh install.sh modellink`, run at every job start) on an image that already holds torch,
with pip's cache filled (the 60 s target of issue 16), next to the README's form (`sh install.sh`).

    python benchmarks/install.py [--repeats 2] [--forms modellink,full] [--no-compile-too]

The "image": a fresh `python -m venv` holding only this machine's torch build (installed once from pip's cache,
then copied for every run, so each run starts from the same bare image). Each run: `sh install.sh [modellink]`
with PYTHON pointing at the copy; wall time and the CPU seconds of the whole process tree. A first, untimed run of
each form fills pip's cache. --no-compile-too also times the modellink form with pip's bytecode compilation off
(PIP_NO_COMPILE=1): the installed packages' .pyc files are then written by the first import instead.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def make_image(root: Path) -> Path:
    """A bare venv with the torch this interpreter has (CPU wheels index as the fallback, as install.sh does)."""
    import torch

    image = root / "image"
    subprocess.run([sys.executable, "-m", "venv", str(image)], check=True)
    pip = [str(image / "bin" / "python"), "-m", "pip", "install", "-q", f"torch=={torch.__version__}"]
    if subprocess.run(pip).returncode != 0:
        subprocess.run([*pip, "--index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    return image


def timed_install(image: Path, root: Path, form: str, env_extra: dict) -> tuple[float, float]:
    """(wall s, CPU s) of one install.sh run into a fresh copy of the image."""
    target = root / "run"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(image, target, symlinks=True)
    cmd = ["sh", str(REPO / "install.sh"), *([] if form == "full" else [form])]
    env = {**os.environ, "PYTHON": str(target / "bin" / "python"), **env_extra}
    env.pop("PYTHONPATH", None)
    c0, t0 = _cpu_of_children(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_of_children() - c0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, cpu


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--forms", default="modellink,full")
    ap.add_argument("--no-compile-too", action="store_true")
    a = ap.parse_args()
    variants = [(f, {}) for f in a.forms.split(",")]
    if a.no_compile_too:
        variants.append(("modellink", {"PIP_NO_COMPILE": "1"}))
    loads = [loadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = make_image(root)
        for form, extra in variants:  # fills pip's cache: every timed run below installs from it
            timed_install(image, root, form, extra)
        results: dict[int, list] = {i: [] for i in range(len(variants))}
        for _ in range(a.repeats):  # interleaved, so a change of the machine's load hits every variant
            for i, (form, extra) in enumerate(variants):
                results[i].append(timed_install(image, root, form, extra))
                loads.append(loadavg())
                print(form, extra, results[i][-1], flush=True)
    print(f"\nload average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}; medians of {a.repeats}")
    print("| form | wall s (each) | CPU s (each) |")
    print("|---|---|---|")
    for i, (form, extra) in enumerate(variants):
        walls, cpus = [r[0] for r in results[i]], [r[1] for r in results[i]]
        name = f"`sh install.sh{'' if form == 'full' else ' ' + form}`" + (" with PIP_NO_COMPILE=1" if extra else "")
        print(f"| {name} | {statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)}) | "
              f"{statistics.median(cpus):.1f} ({', '.join(f'{c:.1f}' for c in cpus)}) |")
    print("target: the modellink form under 60 s with pip's cache filled")


if __name__ == "__main__":
    main()
