"""The single call site of `hydra.utils.instantiate`.

Every `_target_` in a node is checked against the allow-list (config/targets.py) first, so a
config file can only construct the components allowed at that key — never arbitrary callables.
"""
from __future__ import annotations

from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from distill_cli.data.unlabeled import RUN_KEYS as DATA_RUN_KEYS  # read by the runner
from distill_cli.config.targets import check_targets, opted_in
from distill_cli.errors import UserError

# Keys of the teacher node that describe where its weights come from, not the architecture.
TEACHER_SOURCE_KEYS = ("checkpoint", "seed", "train", "outputs", "outputs_dtype")
# Keys of a loss node that the launcher reads, not the objective's constructor (BD-KD's online
# teacher trains with its own optimizer and scheduler).
# keys of a loss node the runner reads (the networks a topology trains besides the student)
LOSS_RUN_KEYS = ("teacher_optimizer", "teacher_scheduler", "critic_optimizer", "critic_scheduler")


def instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate `node` (the config at `key`) after the allow-list check."""
    check_targets(node, key, opted_in())
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        cause = exc
        while getattr(cause, "__cause__", None) is not None:  # Hydra wraps the real error
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise UserError(f"Cannot build `{key}`: {cause}", key,
                            f"Check the options under `{key}` (`distill --cfg job` prints them)"
                            ) from exc
        raise


def model_node(node: DictConfig) -> DictConfig | None:
    """The architecture part of a teacher/student node, or None for `none`."""
    if node.get("arch") is None:
        return None
    plain = OmegaConf.to_container(node, resolve=True)
    for k in TEACHER_SOURCE_KEYS:
        plain.pop(k, None)
    return OmegaConf.create(plain)


def build_model(node: DictConfig, key: str, data) -> Any:
    arch = model_node(node)
    return instantiate(arch, key, num_classes=data.num_classes,
                       in_channels=data.input_shape[0], input_size=tuple(data.input_shape[1:]))


def _without(node: DictConfig, keys) -> DictConfig:
    """`node` minus the keys the runner reads itself (the built class never sees them)."""
    if not any(k in node for k in keys):
        return node
    plain = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in plain.items() if k not in keys})


def build_data(node: DictConfig, key: str = "dataset"):
    return instantiate(_without(node, DATA_RUN_KEYS), key)


def build_task(node: DictConfig):
    return instantiate(node, "task")


def objective_class(node: DictConfig) -> type:
    """The class `node` would build, located (after the allow-list check) but not built."""
    check_targets(node, "loss", opted_in())
    return hydra.utils.get_class(node._target_)


def build_objective(node: DictConfig):
    return instantiate(_without(node, LOSS_RUN_KEYS), "loss")


def _call_partial(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate a `_partial_` node and call it; options the callable does not take (e.g. a
    recipe's SGD `nesterov` left under `optimizer=adamw`) are a user error naming the key."""
    factory = instantiate(node, key)
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        extra = [k for k in node if not str(k).startswith("_") and f"'{k}'" in str(exc)]
        remove = (" ".join(f"'~{key}.{k}'" for k in extra) if extra
                  else f"overrides that delete the stray option under `{key}`")
        raise UserError(f"Cannot build `{key}` ({node.get('_target_')}): {exc}",
                        f"{key}.{extra[0]}" if extra else key,
                        f"Pass {remove} to drop it (an option of another {key} choice, e.g. set "
                        f"by a recipe); `distill --cfg job` prints the composed `{key}`") from None


def build_optimizer(node: DictConfig, params):
    return _call_partial(node, "optimizer", params)


def build_scheduler(node: DictConfig, optimizer, steps_per_epoch: int, epochs: int):
    return _call_partial(node, "scheduler", optimizer, steps_per_epoch=steps_per_epoch,
                         epochs=epochs)


def build_logger(node: DictConfig, **kwargs):
    return instantiate(node, "logger")(**kwargs)
