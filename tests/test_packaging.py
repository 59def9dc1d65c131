"""What ComfyUI, its registry and pip read from the pack: pyproject.toml, requirements.txt, web/, locales/.

References: the registry's pyproject fields as ComfyUI's own parser names them (comfy_config/types.py:
`[tool.comfy]` PublisherId, DisplayName, Icon, includes, web; `requires-comfyui`); ComfyUI's loader
serves `WEB_DIRECTORY` / `[tool.comfy] web` and imports every .js file there as an ES module; the
front end 1.27.10 ships its extension API as shim modules under /scripts/ (scripts/app.js, api.js).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import comfyui_controlnet_core as pack

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s<>=!~;\[]", r.strip(), maxsplit=1)[0].lower() for r in requirements if r.strip()]


def test_requirements_txt_is_pyprojects_dependencies_without_torch():
    deps = _names(PYPROJECT["project"]["dependencies"])
    reqs = _names([ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if not ln.startswith("#")])
    assert sorted(reqs) == sorted(d for d in deps if d != "torch")
    assert "aiohttp" in deps  # the routes
    # ComfyUI pins its front end itself; a requirement of ours could replace it
    assert not any(d.startswith("comfyui-frontend-package") for d in deps + reqs)


def test_registry_metadata():
    comfy = PYPROJECT["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes", "web", "requires-comfyui"} <= set(comfy)
    assert comfy["DisplayName"] and re.fullmatch(r">=\s*\d+\.\d+\.\d+", comfy["requires-comfyui"])
    name = PYPROJECT["project"]["name"]
    assert re.fullmatch(r"[a-z][a-z0-9._-]{0,98}", name) and not re.search(r"[._-]{2}", name)
    # the web folder named there is the one __init__.py serves, and pip ships it
    assert (ROOT / comfy["web"]).resolve() == (ROOT / pack.WEB_DIRECTORY).resolve()
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["comfyui_controlnet_core"]
    assert {"web/*.js", "workflows/*.jpg", "locales/*/*.json"} <= set(data)


def test_web_extension_is_plain_es_modules_on_the_front_ends_shims():
    scripts = sorted((ROOT / pack.WEB_DIRECTORY).glob("*.js"))
    assert [p.name for p in scripts] == ["loader.js", "preprocessor.js"]
    for p in scripts:
        text = p.read_text()
        imports = re.findall(r'^\s*import\s.*?from\s+"([^"]+)"', text, flags=re.M)
        assert imports and set(imports) <= {"../../scripts/app.js", "../../scripts/api.js"}, (p.name, imports)
        assert "console.error" not in text  # problems are shown in the node
        assert "registerExtension" in text and "Symbol.for(" in text  # registered once even if served twice


def test_locales_name_the_template_category():
    main = json.loads((ROOT / "locales" / "en" / "main.json").read_text())
    assert main["templateWorkflows"]["category"][PYPROJECT["project"]["name"]] == PYPROJECT["tool"]["comfy"][
        "DisplayName"]
