"""The code location's image, checked without a container builder: every path it copies exists
and is not left out of the build context, and its install is `make install`'s (same constraints,
same torch pin first, extras a subset of the Makefile's, same pins of the model files), with
the build argument that picks CPU or CUDA torch, as the README's build commands use it."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY_EXTRAS = {"tools", "train", "deploy"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
               or fnmatch.fnmatch(Path(p).name, pat.removeprefix("**/"))
               for p in prefixes for pat in patterns)


def makefile_install() -> dict[str, object]:
    """What `make install` installs: its constraints file, torch pin, extras and no-deps pins."""
    text = (REPO / "Makefile").read_text()
    constraint = re.search(r"^PIP\s*:=.*--constraint\s+(\S+)", text, re.M)
    torch = re.search(r"\$\(PIP\)\s+torch==(\S+)", text)
    extras = re.search(r'\$\(PIP\).*--editable\s+"\.\[([^\]]+)\]"', text)
    no_deps = re.findall(r"\$\(PIP\)\s+--no-deps\s+(\S+==\S+)", text)
    assert constraint and torch and extras, "the Makefile's install recipe changed shape"
    return {"constraint": constraint.group(1), "torch": torch.group(1),
            "extras": set(extras.group(1).split(",")), "no_deps": set(no_deps)}


def dockerfile_install(steps: list[tuple[str, str]]) -> dict[str, object]:
    args = dict(a.partition("=")[::2] for kind, a in steps if kind == "ARG")
    runs = " && ".join(a for kind, a in steps if kind == "RUN")
    pips = [shlex.split(cmd.strip()) for cmd in runs.split("&&") if cmd.strip().startswith("pip install")]
    constraints = {w[w.index("--constraint") + 1] for w in pips if "--constraint" in w}
    torch = [w for w in pips if any(t.startswith("torch==") for t in w)]
    extras = [t for w in pips for t in w if t.startswith(".[")]
    no_deps = {t for w in pips if "--no-deps" in w for t in w if "==" in t}
    return {"args": args, "constraints": constraints, "torch": torch, "extras": extras, "no_deps": no_deps,
            "pips": pips}


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    steps = instructions((REPO / "Dockerfile").read_text())
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [shlex.split(a) for kind, a in steps if kind == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path"
            assert not _ignored(src, patterns), f"COPY {src}: left out by .dockerignore"
    copied = {w for words in copies for w in words[:-1]}
    assert {"mmat_assets", "plugins", "definitions.py", "pyproject.toml"} <= copied


def test_install_is_make_install() -> None:
    make = makefile_install()
    docker = dockerfile_install(instructions((REPO / "Dockerfile").read_text()))
    assert docker["constraints"] == {make["constraint"]}, "every pip install uses the Makefile's constraints"
    assert all("--constraint" in w for w in docker["pips"])
    (torch,) = docker["torch"]
    assert "torch==${TORCH_VERSION}" in torch and docker["args"]["TORCH_VERSION"] == make["torch"]
    assert docker["pips"].index(torch) == 0, "torch comes first, so nothing later pulls another build"
    (extras,) = docker["extras"]
    wanted = set(extras.removeprefix(".[").removesuffix("]").split(","))
    assert DEPLOY_EXTRAS <= wanted <= make["extras"]
    assert docker["no_deps"] == make["no_deps"]


def test_build_argument_picks_cpu_or_cuda_torch_as_the_readme_says() -> None:
    steps = instructions((REPO / "Dockerfile").read_text())
    docker = dockerfile_install(steps)
    assert docker["args"]["TORCH"] == "cpu"
    (torch,) = docker["torch"]
    assert "https://download.pytorch.org/whl/${TORCH}" in torch
    readme = (REPO / "README.md").read_text()
    builds = [line for line in readme.splitlines() if line.strip().startswith("docker build")]
    assert len(builds) >= 2, "README shows the CPU and the CUDA build"
    used = {m.group(1): m.group(2) for b in builds for m in re.finditer(r"--build-arg\s+(\w+)=(\S+)", b)}
    assert set(used) <= set(docker["args"]), used
    assert used.get("TORCH", "").startswith("cu")
    cmd = next(a for kind, a in steps if kind == "CMD")
    assert '"dagster", "api", "grpc"' in cmd and "/opt/mmat/definitions.py" in cmd
