#!/usr/bin/env python3
"""Check that an environment is exactly requirements.lock (make check-lock).

Compares `pip freeze --all --exclude-editable` of the running interpreter (or a saved freeze, --freeze FILE) with
the `name==version` pins of the lock, names case/underscore-normalised (PEP 503); pip itself and the editable
crackclf are not in the lock and are ignored. With --wheel-dir DIR (repeatable) it also checks that every local
wheel/sdist of a pinned version that this interpreter could install has its sha256 among the lock's --hash lines
(so `pip install --require-hashes` accepts the local file pip picks). Exit status 1 lists every difference.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

IGNORED = {"pip", "crackclf"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, set[str]]]:
    pins: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            current = norm(m[1])
            pins[current] = (m[2], set())
        elif line.strip().startswith("--hash=") and current and (h := HASH.search(line)):
            pins[current][1].add(h[1])
        elif line and not line[0].isspace():
            current = None
    return pins


def read_freeze(text: str) -> tuple[dict[str, str], list[str]]:
    installed, unpinned = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")):
            continue
        if m := PIN.match(line):
            installed[norm(m[1])] = m[2]
        else:
            unpinned.append(line)  # e.g. `name @ file:///...`: not something the lock installs
    return installed, unpinned


def check_local_files(pins: dict[str, tuple[str, set[str]]], dirs: list[Path]) -> list[str]:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

    tags, problems = set(sys_tags()), []
    for d in dirs:
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            try:
                if f.name.endswith(".whl"):
                    name, version, _, wheel_tags = parse_wheel_filename(f.name)
                    if not wheel_tags & tags:
                        continue
                else:
                    name, version = parse_sdist_filename(f.name)
            except ValueError:
                continue
            pin = pins.get(canonicalize_name(name))
            if pin and str(version) == pin[0]:
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                if digest not in pin[1]:
                    problems.append(f"hash of local {f} (sha256:{digest}) is not in the lock")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lock", nargs="?", default="requirements.lock", type=Path)
    ap.add_argument("--freeze", type=Path, help="a saved `pip freeze` output instead of this interpreter's")
    ap.add_argument("--wheel-dir", type=Path, action="append", default=[], help="local wheel folder to hash-check")
    args = ap.parse_args()

    pins = read_lock(args.lock)
    if args.freeze:
        freeze = args.freeze.read_text()
    else:
        cmd = [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"]
        freeze = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    installed, unpinned = read_freeze(freeze)

    problems = [f"not installed from the lock: {line}" for line in unpinned]
    for name in sorted((set(pins) | set(installed)) - IGNORED):
        want, have = pins.get(name, (None, None))[0], installed.get(name)
        if want != have:
            problems.append(f"{name}: lock {want or '-'}, installed {have or '-'}")
    problems += check_local_files(pins, args.wheel_dir)

    for p in problems:
        print(p)
    print(f"{args.lock}: {len(pins)} pins, {len(installed)} installed packages, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
