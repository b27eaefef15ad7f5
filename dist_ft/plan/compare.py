"""`--all-strategies`: the recipe under every backend x offload x method the backends' specs accept, and the
fastest one that fits. Each backend offers the offload choices its spec lists (`BackendSpec.offloads`); a variant
its spec refuses (`spec_problems`: a method, an optimizer, an offload) is left out, never offered."""

from __future__ import annotations

import copy
from typing import Any, Optional

from ..distributed.spec import all_specs, spec_problems
from .cluster import Cluster
from .model import ModelFacts, analyze_model
from .verdict import Plan, make_plan


def variants(recipe, facts: ModelFacts) -> list[tuple[Any, str]]:
    """Every strategy x offload x method the project accepts for this recipe: (recipe, label)."""
    from ..config import RecipeError, recipe_from_dict, recipe_to_dict

    base = recipe_to_dict(recipe)
    methods = ["full", "lora"]
    if any(n not in facts.head_modules for n in facts.linears):
        methods.append("qlora")
    if recipe.method.kind not in methods:
        methods.append(recipe.method.kind)
    default_partial = recipe_to_dict(type(recipe)())["method"]["partial"]
    out = []
    for spec in all_specs().values():
        for off in spec.offloads:
            for kind in methods:
                data = copy.deepcopy(base)
                data["distributed"]["strategy"] = spec.name
                data["distributed"]["offload"] = off
                if not spec.engine_config:
                    data["distributed"]["deepspeed_config"] = None
                data["method"]["kind"] = kind
                if kind != "partial":
                    data["method"]["partial"] = copy.deepcopy(default_partial)
                try:
                    variant = recipe_from_dict(data)
                except RecipeError:  # the recipe check refuses it (it reads the spec's refusals too)
                    continue
                if not spec_problems(variant, spec):
                    out.append((variant, f"{spec.name} {off} {kind}"))
    return out


def compare(recipe, cluster: Cluster, facts: Optional[ModelFacts] = None) -> list[Plan]:
    facts = facts or analyze_model(recipe)
    plans = [make_plan(r, cluster, facts=facts) for r, _ in variants(recipe, facts)]
    return plans


def recommend(plans: list[Plan], method: Optional[str] = None) -> Optional[Plan]:
    ok = [p for p in plans if p.verdict == "fits" and p.speed.get("tokens_per_s") and
          (method is None or p.counts.kind == method)]
    if not ok:
        ok = [p for p in plans if p.verdict == "fits" and (method is None or p.counts.kind == method)]
        return min(ok, key=lambda p: p.device_total) if ok else None
    # the fastest; on a tie, the one that communicates less, then the one with more memory to spare
    return min(ok, key=lambda p: (-round(p.speed["tokens_per_s"], 6), p.speed["comm_s"], -p.margin_gib))
