"""A small Kustomize renderer: the subset deploy/k8s uses, for machines without kubectl.

Supports ``resources`` (files and kustomization directories), ``labels`` (``pairs`` added
to metadata.labels; not to selectors or pod templates), ``images`` (``newName``/``newTag``)
and ``patches`` with a ``path`` to a strategic-merge patch (maps merge; lists of objects
with a ``name`` merge by name, new ones placed first as kustomize does; other lists are
replaced, as Kubernetes does for tolerations, args and the like). Anything else in a kustomization.yaml raises ValueError,
so a manifest change that needs real Kustomize cannot pass unnoticed; where ``kubectl``
exists, tests/deploy/test_k8s.py checks this renderer against ``kubectl kustomize``.

    python tools/kustomize.py deploy/k8s/overlays/gpu     # print the rendered YAML
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["render", "strategic_merge"]

_SUPPORTED = {"apiVersion", "kind", "resources", "labels", "images", "patches"}


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` would print (for the supported subset)."""
    root = Path(directory)
    spec = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8")) or {}
    unknown = set(spec) - _SUPPORTED
    if unknown:
        raise ValueError(f"{root}/kustomization.yaml uses {sorted(unknown)}; this renderer "
                         f"supports only {sorted(_SUPPORTED)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = root / entry
        if path.is_dir():
            objects.extend(render(path))
        else:
            docs = yaml.safe_load_all(path.read_text(encoding="utf-8"))
            objects.extend(d for d in docs if d)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{root}: only patches with a path are supported, got {patch}")
        _apply_patch(objects, yaml.safe_load((root / patch["path"]).read_text(encoding="utf-8")))
    for group in spec.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise ValueError(f"{root}: labels with includeSelectors/includeTemplates unsupported")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` (a new object; neither argument is changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(patch):
        # Items only in the patch come first, in the patch's order, as kustomize puts them.
        merged = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged)}
        added = []
        for item in patch:
            if item["name"] in index:
                merged[index[item["name"]]] = strategic_merge(merged[index[item["name"]]], item)
            else:
                added.append(copy.deepcopy(item))
        return added + merged
    return copy.deepcopy(patch)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and "name" in v for v in value)


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    key = (patch["kind"], patch["metadata"]["name"])
    for i, obj in enumerate(objects):
        if (obj["kind"], obj["metadata"]["name"]) == key:
            objects[i] = strategic_merge(obj, patch)
            return
    raise ValueError(f"patch target {key} is not among the resources")


def _set_image(objects: list[dict[str, Any]], image: dict[str, str]) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = (f"{image.get('newName', name)}:"
                                      f"{image.get('newTag', tag) or 'latest'}")


if __name__ == "__main__":
    print(yaml.safe_dump_all(render(sys.argv[1]), sort_keys=False), end="")
