"""Oracles for the network annotators' tests: controlnet-aux 0.0.10 ("CNA") module by module.

`import controlnet_aux` runs its package __init__, which imports every detector and with them
torchvision, timm and mediapipe-era dependencies the oracles do not need (and a PyPI torchvision
does not import beside a CPU torch). `cna(sub)` imports only `controlnet_aux.<sub>`: the package
is registered as a bare namespace over its installed folder, so its __init__ never runs. Tests
skip (env-gated: the `annotators` test extra) when controlnet-aux is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def cna(sub: str):
    """`controlnet_aux.<sub>` without running the __init__.py of the packages above it (e.g.
    `cna("normalbae.nets.NNET")` skips normalbae/__init__.py, which imports torchvision)."""
    spec = importlib.util.find_spec("controlnet_aux") if "controlnet_aux" not in sys.modules else None
    if "controlnet_aux" not in sys.modules and (spec is None or not spec.submodule_search_locations):
        pytest.skip("controlnet-aux is not installed (the `annotators` test extra: "
                    "EXTRAS=test,annotators scripts/test.sh installs it)")
    parts = ["controlnet_aux", *sub.split(".")]
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name in sys.modules:
            continue
        parent = sys.modules.get(".".join(parts[: i - 1])) if i > 1 else None
        paths = list(spec.submodule_search_locations) if parent is None else [f"{parent.__path__[0]}/{parts[i - 1]}"]
        pkg = types.ModuleType(name)
        pkg.__path__ = paths  # a bare package: its __init__.py is not run
        sys.modules[name] = pkg
    return importlib.import_module(".".join(parts))


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is an oracle of the `annotators` test extra")
