"""The allow-list: which callables a config may construct, node by node.

A `_target_` names a callable that Hydra imports and calls, so a config file or an override could
otherwise run anything (`loss._target_=distill_cli.runs.checkpoint.os.makedirs`, a callback
`_target_=os.system`, a logging handler `class: os.makedirs`). Every composed config — the
`hydra` node included, before Hydra builds its callbacks, launcher and sweeper — is checked here:

- each `_target_` must be the plain `<module>.<name>` of a class or function whose *defining*
  module (`obj.__module__`) lies in a package allowed for that node (the `loss` node: only
  `distill_cli.losses`; `optimizer`: only `torch.optim`; …). An attribute path through a module
  (`…checkpoint.os.makedirs`) or a class (`…KD.load_state_dict`) names a callable defined
  elsewhere, so it is refused;
- the import happens only after the string itself is inside an allowed package, so no module
  outside the allow-list is ever imported because a config named it;
- a user's own package is allowed only when they opt in: `allow_targets=[mypkg]`.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from distill_cli.errors import UserError

# Node name (the nearest named ancestor of a `_target_`) → packages that may define its callable.
_MODELS = ("distill_cli.models",)
_OPTIMIZERS = ("torch.optim",)
_SCHEDULERS = ("distill_cli.schedules", "torch.optim.lr_scheduler")
_LAUNCHERS = ("hydra._internal.core_plugins", "hydra_plugins.hydra_joblib_launcher",
              "hydra_plugins.hydra_submitit_launcher")
NODE_PACKAGES: dict[str, tuple[str, ...]] = {
    # a family's own objectives live under its task (dataset distillation's methods/)
    "loss": ("distill_cli.losses", "distill_cli.tasks.dataset_distill.methods",
             "distill_cli.tasks.lm.methods", "distill_cli.tasks.diffusion.methods",
             "distill_cli.tasks.agent.methods"),
    "student": _MODELS, "teacher": _MODELS, "teachers": _MODELS, "candidates": _MODELS,
    "feature_net": _MODELS,   # task=diffusion's stored classifier (FD/KID features)
    "dataset": ("distill_cli.data",),
    "task": ("distill_cli.tasks",),
    "optimizer": _OPTIMIZERS, "teacher_optimizer": _OPTIMIZERS,
    "scheduler": _SCHEDULERS, "teacher_scheduler": _SCHEDULERS,
    "logger": ("distill_cli.reporting",),
    "callbacks": ("distill_cli.config.hydra_callbacks",),
    "launcher": _LAUNCHERS,
    "sweeper": ("hydra._internal.core_plugins", "hydra_plugins.hydra_optuna_sweeper"),
    "sampler": ("optuna.samplers",),
}
# Python's logging.config builds handlers, formatters and filters from `class` / `()` keys.
LOGGING_NODES = ("hydra.job_logging", "hydra.hydra_logging")
LOGGING_FACTORY_KEYS = ("class", "()")
LOGGING_PACKAGES = ("logging",)
LOGGING_EXTERNALS = ("ext://sys.stdout", "ext://sys.stderr")
# Plugin options that name a function the plugin imports and calls.
CALLABLE_STRINGS = {"hydra.sweeper.custom_search_space": ()}
ALLOW_KEY = "allow_targets"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _inside(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _node_name(key: str) -> str | None:
    """The nearest named ancestor of `key` that has a rule (`teacher.train.loss` → `loss`)."""
    for part in reversed(re.sub(r"\[\d+\]", "", key).split(".")):
        if part in NODE_PACKAGES:
            return part
    return None


def user_packages(cfg: Any) -> tuple[str, ...]:
    """The packages a user opted into with `allow_targets=[...]` (top-level key)."""
    raw = cfg.get(ALLOW_KEY) if isinstance(cfg, DictConfig) else None
    if raw is None:
        return ()
    names = list(raw) if isinstance(raw, ListConfig) else [raw]
    for name in names:
        if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name)
                or name.split(".")[0] in sys.stdlib_module_names
                or name.split(".")[0] in ("builtins", "torch", "hydra", "omegaconf")):
            raise UserError(f"`{ALLOW_KEY}` may list only your own packages, not {name!r}",
                            ALLOW_KEY, "Name the top-level package (or module) that defines "
                            "your components, e.g. `allow_targets=[mypkg]`; the standard "
                            "library, torch and hydra cannot be opted in")
    return tuple(names)


def _refuse(target: str, key: str, packages, why: str) -> UserError:
    allowed = ", ".join(packages) if packages else "nothing"
    return UserError(
        f"`{key}: {target}` is not allowed: {why}", key,
        f"A config may only build callables defined in {allowed} at this key (named as "
        "`<module>.<name>`). To build your own component, put it in your package and opt in "
        f"with `{ALLOW_KEY}=[yourpkg]`")


def check_callable(target: Any, key: str, packages: tuple[str, ...]) -> None:
    """Refuse unless `target` is `<module>.<name>`, inside `packages`, for a class or function
    defined in `packages`. Imports only modules inside `packages`."""
    if not isinstance(target, str) or not _NAME.match(target):
        raise _refuse(str(target), key, packages, "not a dotted `<module>.<name>` path")
    if not _inside(target, packages):
        raise _refuse(target, key, packages, "outside the allowed packages")
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    obj = getattr(module, name, None) if module is not None else None
    if obj is None:
        raise _refuse(target, key, packages, f"`{module_name}` is not a module that defines "
                      f"`{name}` (an attribute path through a module or class is not accepted)")
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise _refuse(target, key, packages, "it is not a class or a function")
    defined_in = getattr(obj, "__module__", None) or ""
    if not _inside(defined_in, packages):
        raise _refuse(target, key, packages, f"it is defined in `{defined_in}`")


def _children(node: DictConfig | ListConfig, key: str):
    """(key, child container) pairs, interpolations resolved where they resolve now (a node
    made by `${oc.create:...}` is checked like a written one); None/missing nodes skipped."""
    items = (node.keys() if isinstance(node, DictConfig) else range(len(node)))
    for k in items:
        child_key = (f"{key}.{k}" if key else str(k)) if isinstance(node, DictConfig) \
            else f"{key}[{k}]"
        child = node._get_node(k)
        if child is None or child._is_missing() or child._is_none():
            continue
        if child._is_interpolation():
            try:
                child = node[k]
            except Exception:   # resolvable only later (e.g. `${hydra:...}`): not a container
                continue
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            yield child_key, child


def check_targets(node: Any, key: str = "", extra: tuple[str, ...] = ()) -> None:
    """Walk a (sub)config: every `_target_`, logging factory and callable-naming plugin option
    must pass the allow-list for its node. `extra` = the user's opted-in packages."""
    if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing():
        return
    if isinstance(node, DictConfig):
        for name in ("_target_",):
            value = _value(node, name)
            if value is not None:
                rule = _node_name(key)
                check_callable(value, f"{key}.{name}" if key else name,
                               (NODE_PACKAGES[rule] if rule else ()) + extra)
        for child_key, packages in CALLABLE_STRINGS.items():
            parent, _, name = child_key.rpartition(".")
            if parent == key and _value(node, name) is not None:
                check_callable(_value(node, name), child_key, packages + extra)
        if key.startswith(LOGGING_NODES):
            _check_logging_entries(node, key, extra)
    for child_key, child in _children(node, key):
        check_targets(child, child_key, extra)


def _value(node: DictConfig, name: str) -> Any:
    """`node[name]` resolved, or None when absent, missing or not resolvable yet."""
    if name not in node.keys() or OmegaConf.is_missing(node, name):
        return None
    try:
        return node[name]
    except Exception:
        return None


def _check_logging_entries(node: DictConfig, key: str, extra: tuple[str, ...]) -> None:
    for k in LOGGING_FACTORY_KEYS:
        if _value(node, k) is not None:
            check_callable(_value(node, k), f"{key}.{k}", LOGGING_PACKAGES + extra)
    for k in node.keys():
        raw = _value(node, k)
        if isinstance(raw, str) and raw.startswith("ext://") and raw not in LOGGING_EXTERNALS:
            raise UserError(f"`{key}.{k}: {raw}` is not allowed", f"{key}.{k}",
                            f"Logging configs may refer only to {', '.join(LOGGING_EXTERNALS)}")


# The packages the composed config of this process opted into (`allow_targets`), read by the
# build-time check (config/build.py) whose nodes no longer know their root config.
_opted_in: tuple[str, ...] = ()


def opted_in() -> tuple[str, ...]:
    return _opted_in


def check_config(cfg: DictConfig) -> None:
    """The whole composed config, `hydra` node included (callbacks, launcher, sweeper,
    logging), against the allow-list; raises UserError at the first refused callable."""
    global _opted_in
    extra = user_packages(cfg)
    check_targets(cfg, "", extra)
    _opted_in = extra
