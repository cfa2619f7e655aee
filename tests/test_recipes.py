"""Every recipe composes, pins what a reproducible experiment needs, and builds. The assertions
are on the COMPOSED config: a recipe extends a protocol (conf/protocol/) and is specialised per
loss (conf/recipe_loss/), so its own file is not the whole story."""
from __future__ import annotations


from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.data.fake import build as fake_data
from distill_cli.losses.base import Objective, PoolObjective
from distill_cli.teachers.pool import entry_node

from conftest import make_cfg

RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))
# classifier distillation (dataset distillation's dd_* recipes: test_dd_task.py; language
# models' lm_*: test_lm_task.py; diffusion_*: test_diffusion_task.py; agent_*:
# test_agent_task.py)
MODEL_RECIPES = [r for r in RECIPES if not r.startswith(("dd_", "lm_", "diffusion_", "agent_"))]
# synthetic stand-ins of the recipes' datasets (same shape and classes), except MNIST-1D which
# is generated locally anyway
SHAPES = {"cifar.build_cifar100": ([3, 32, 32], 100), "imagefolder.build": ([3, 224, 224], 1000),
          "fashion_mnist.build": ([1, 28, 28], 10)}


# the groups a recipe pins (through its own defaults list or its protocol's), and for each a
# choice other than config.yaml's: composed under a primary config with THESE defaults, a recipe
# must come out the same as under config.yaml
PINNED = {"dataset": "digits", "teacher": "resnet20", "student": "resnet14", "loss": "pld",
          "optimizer": "adamw", "scheduler": "none"}


@pytest.fixture(scope="module")
def compose_other_defaults(tmp_path_factory):
    """compose(overrides) under a copy of config.yaml whose defaults list chooses PINNED and a
    trainer of 1 epoch, batch 3 (a `trainer/other.yaml` next to it)."""
    from hydra import compose, initialize_config_dir

    root = tmp_path_factory.mktemp("other_defaults")
    primary = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    choices = {**PINNED, "trainer": "other"}
    primary.defaults = [entry if isinstance(entry, str) else
                        {group: choices.get(group, choice) for group, choice in entry.items()}
                        for entry in OmegaConf.to_container(primary.defaults)]
    primary.hydra.searchpath = [f"file://{CONF_DIR}"]
    OmegaConf.save(primary, root / "other.yaml")
    (root / "trainer").mkdir()
    (root / "trainer" / "other.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nepochs: 1\nbatch_size: 3\n")

    def compose_other(overrides: list[str]):
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            return compose(config_name="other", overrides=overrides, return_hydra_config=True)
    return compose_other


def test_the_promised_recipes_exist():
    assert {"quickstart", "fmnist_bench", "mnist1d_cnn_to_mlp", "imagenet_r34_r18_kd",
            "imagenet_r34_r18_dkd"} <= set(RECIPES)
    cifar = [r for r in RECIPES if r.startswith("cifar100_")]
    assert len(cifar) == 16  # 8 teacher-student pairs x {KD, DKD}


@pytest.mark.parametrize("recipe", MODEL_RECIPES)
def test_recipe_composes_and_builds(recipe):
    cfg = make_cfg([f"recipe={recipe}"])
    assert "loss_options" not in cfg and "recipe_loss" not in cfg
    resolved = OmegaConf.to_container(cfg, resolve=True)
    objective = build.build_objective(cfg.loss)
    assert isinstance(objective, Objective) and objective.needs_teacher
    # one teacher, or a pool (`teachers`) for multi-teacher objectives
    pool = [entry_node(cfg.teacher, e, i) for i, e in enumerate(cfg.teachers)]
    assert bool(pool) == isinstance(objective, PoolObjective)
    assert pool or resolved["teacher"]["arch"] is not None
    if cfg.dataset._target_.endswith("mnist1d.build"):
        data = build.build_data(cfg.dataset)
    else:
        shape, classes = next(v for k, v in SHAPES.items() if cfg.dataset._target_.endswith(k))
        data = fake_data(shape=shape, num_classes=classes, train_size=8, test_size=4)
    student = build.build_model(cfg.student, "student", data)
    params = list(student.parameters())
    optimizer = build.build_optimizer(cfg.optimizer, params)
    build.build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=10,
                          epochs=int(cfg.trainer.epochs))
    x = torch.zeros(2, *data.input_shape)
    for node in pool or [cfg.teacher]:
        node = OmegaConf.merge(node, {"weights": None} if "weights" in node else {})
        teacher = build.build_model(node, "teacher", data)
        assert student(x).shape == teacher(x).shape == (2, data.num_classes)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_builds_its_optimizer_and_scheduler(recipe):
    """What a recipe sets under `optimizer` is taken by the optimizer it composes to: an option of
    another choice inherited from a recipe it extends (SGD's `momentum` under Adam) would be a
    user error at the first step."""
    cfg = make_cfg([f"recipe={recipe}"])
    optimizer = build.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    build.build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=3, epochs=2)


def test_every_recipe_names_its_source():
    # the one check on a recipe file's text: its comments, which no composition carries
    for recipe in RECIPES:
        comments = [line for line in (Path(CONF_DIR) / "recipe" / f"{recipe}.yaml")
                    .read_text().splitlines() if line.startswith("#")]
        assert any("Source:" in line for line in comments), f"{recipe} names its source"


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_pins_the_experiment(recipe, compose_other_defaults):
    """Teacher, student, loss, dataset, optimizer, scheduler, epochs and batch size come from the
    recipe (or the protocol it extends), never from config.yaml's defaults."""
    ours = make_cfg([f"recipe={recipe}"])
    other = compose_other_defaults([f"recipe={recipe}"])
    for group in PINNED:
        assert OmegaConf.to_container(other[group], resolve=True) \
            == OmegaConf.to_container(ours[group], resolve=True), group
    assert (other.trainer.epochs, other.trainer.batch_size) \
        == (ours.trainer.epochs, ours.trainer.batch_size) != (1, 3)


@pytest.mark.parametrize("recipe,pair,beta", [("cifar100_r32x4_r8x4_dkd", ("resnet32x4", "resnet8x4"), 8),
                                              ("cifar100_r56_r20_dkd", ("resnet56", "resnet20"), 2),
                                              ("cifar100_vgg13_mv2_dkd", ("vgg13", "mobilenetv2"), 6)])
def test_cifar_dkd_recipes_follow_the_protocol(recipe, pair, beta):
    cfg = make_cfg([f"recipe={recipe}"])
    assert (cfg.teacher.arch, cfg.student.arch) == pair
    assert cfg.loss.beta == beta and cfg.loss.warmup == 20 and cfg.loss.temperature == 4
    assert cfg.trainer.epochs == 240 and cfg.trainer.batch_size == 64
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    assert cfg.optimizer.weight_decay == 5e-4
    assert cfg.optimizer.lr == (0.01 if pair[1] == "mobilenetv2" else 0.05)


CIFAR = [r for r in RECIPES if r.startswith("cifar100_")]


@pytest.mark.parametrize("recipe", CIFAR)
def test_cifar_recipes_compose_the_repdistiller_protocol(recipe):
    """All 16 extend conf/protocol/cifar100_repdistiller.yaml: the values after composition."""
    cfg = make_cfg([f"recipe={recipe}"])
    assert cfg.dataset._target_.endswith("build_cifar100")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (240, 64)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 5e-4 and not cfg.optimizer.nesterov
    assert cfg.optimizer.lr == (0.01 if cfg.student.arch in ("mobilenetv2", "shufflenetv1")
                                else 0.05)
    assert cfg.scheduler._target_.endswith("multistep")
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    # the teacher store's training recipe: the same protocol at lr 0.05, whatever the student
    train = OmegaConf.to_container(cfg.teacher.train, resolve=True)
    assert (train["epochs"], train["batch_size"], cfg.teacher.seed) == (240, 64, 0)
    assert train["optimizer"] == {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05,
                                  "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    assert train["scheduler"].items() >= {"_target_": "distill_cli.schedules.multistep",
                                          "_partial_": True, "milestones": [150, 180, 210],
                                          "gamma": 0.1, "warmup_epochs": 0}.items()
    loss = OmegaConf.to_container(cfg.loss)
    if recipe.endswith("_kd"):
        assert loss == {"_target_": "distill_cli.losses.kd.KD", "temperature": 4.0,
                        "ce_weight": 0.1, "kd_weight": 0.9}
    else:
        assert loss == {"_target_": "distill_cli.losses.dkd.DKD", "temperature": 4.0,
                        "alpha": 1.0, "beta": loss["beta"], "ce_weight": 1.0, "warmup": 20}
        assert loss["beta"] == {"resnet32x4": 8.0, "resnet56": 2.0, "resnet110": 2.0,
                                "wrn_40_2": 6.0, "vgg13": 6.0}[cfg.teacher.arch]


def test_the_store_can_build_the_cifar_teachers_scheduler():
    """The protocol selects multistep for the teacher's schedule too (it once merged multistep's
    keys onto the cosine default, and multistep() refused the stray min_lr_ratio)."""
    from distill_cli.training.teacher_runs import teacher_run_config

    tcfg = teacher_run_config(make_cfg(["recipe=cifar100_r56_r20_kd"]))
    optimizer = build.build_optimizer(tcfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    build.build_scheduler(tcfg.scheduler, optimizer, steps_per_epoch=10, epochs=240)


def test_cifar_recipes_share_a_teacher_per_architecture():
    """The KD and DKD recipes of a pair, and pairs with the same teacher (resnet32x4, wrn_40_2,
    vgg13), ask the teacher store for the same teacher."""
    from distill_cli.teachers.build import teacher_description
    from distill_cli.teachers.store import content_key

    data = fake_data(shape=[3, 32, 32], num_classes=100, train_size=8, test_size=4)
    keys: dict[str, set[str]] = {}
    for recipe in CIFAR:
        cfg = make_cfg([f"recipe={recipe}"])
        key = content_key(teacher_description(cfg.teacher, data, cfg.trainer.precision))
        keys.setdefault(cfg.teacher.arch, set()).add(key)
    assert len(keys) == 5 and all(len(k) == 1 for k in keys.values()), keys


@pytest.mark.parametrize("recipe", ["imagenet_r34_r18_kd", "imagenet_r34_r18_dkd"])
def test_imagenet_recipes_compose_the_mdistiller_protocol(recipe):
    cfg = make_cfg([f"recipe={recipe}"])
    assert cfg.dataset._target_.endswith("imagefolder.build") and cfg.dataset.image_size == 224
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.eval_batch_size) \
        == (100, 256, 512)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) \
        == (0.1, 0.9, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90] and cfg.scheduler.gamma == 0.1
    assert (cfg.teacher.name, cfg.teacher.weights) == ("resnet34", "IMAGENET1K_V1")
    assert (cfg.student.name, cfg.student.weights) == ("resnet18", None)
    assert cfg.loss.temperature == 1.0
    if recipe.endswith("_dkd"):
        assert (cfg.loss.beta, cfg.loss.warmup) == (0.5, 1)
    else:
        assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.5, 0.5)


@pytest.mark.parametrize("recipe", ["quickstart", "fmnist_bench"])
def test_a_recipe_sweep_shares_one_teacher(recipe):
    from distill_cli.teachers.build import teacher_description
    fake = fake_data(shape=[1, 28, 28], num_classes=10, train_size=8, test_size=4)
    cfgs = [make_cfg([f"recipe={recipe}", f"loss={loss}", f"seed={seed}"])
            for loss in ("ce", "kd", "dkd", "pld", "dist") for seed in (0, 1)]
    keys = {str(teacher_description(c.teacher, fake, c.trainer.precision)) for c in cfgs}
    assert len(keys) == 1


def test_command_line_beats_the_recipe():
    cfg = make_cfg(["recipe=quickstart", "loss=dkd", "trainer.epochs=2"])
    assert cfg.loss._target_.endswith("DKD") and cfg.trainer.epochs == 2
    assert cfg.loss.warmup == 2  # the recipe's DKD settings (recipe_loss/quickstart_dkd) apply


def test_mtard_recipe_pairs_the_fmnist_bench_teacher_with_a_robust_one():
    from distill_cli.teachers.store import content_key
    from distill_cli.teachers.build import teacher_description

    cfg = make_cfg(["recipe=fmnist_mtard"])
    bench = make_cfg(["recipe=fmnist_bench"])
    data = fake_data(shape=(1, 28, 28), num_classes=10, train_size=8, test_size=4)
    clean, robust = (entry_node(cfg.teacher, e, i) for i, e in enumerate(cfg.teachers))
    key = lambda node: content_key(teacher_description(node, data, "32"))   # noqa: E731
    assert key(clean) == key(bench.teacher)    # the clean teacher IS fmnist_bench's teacher
    assert robust.train.loss._target_.endswith("AdversarialCE") and key(robust) != key(clean)
    assert cfg.eval.pgd.steps == 20 and cfg.loss._target_.endswith("MTARD")


def test_a_recipe_specialises_a_loss_through_recipe_loss():
    """conf/recipe_loss/<recipe>_<loss>.yaml (Hydra's specializing-config pattern, the `optional
    recipe_loss` entry of config.yaml) applies when that recipe runs that loss, whether the loss
    comes from the command line or from the recipe itself, and nowhere else."""
    def warmup(*overrides):
        return make_cfg(list(overrides)).loss.get("warmup")

    assert warmup("recipe=quickstart", "loss=dkd") == 2
    assert warmup("recipe=fmnist_bench", "loss=dkd") == 2
    assert warmup("recipe=mnist1d_cnn_to_mlp", "loss=dkd") == 5
    assert warmup("loss=dkd") == 20                          # no recipe: dkd's own default
    assert warmup("recipe=cifar100_r56_r20_dkd") == 20       # a recipe without a recipe_loss
    assert warmup("recipe=cifar100_r56_r20_dkd", "loss.warmup=3") == 3
    assert warmup("recipe=quickstart", "loss=dkd", "loss.warmup=7") == 7  # command line wins
    # the recipe's other losses compose without the DKD settings
    kd = make_cfg(["recipe=quickstart", "loss=kd"]).loss
    assert OmegaConf.to_container(kd) == OmegaConf.to_container(make_cfg(["loss=kd"]).loss)
    assert OmegaConf.to_container(make_cfg(["recipe=quickstart"]).loss) \
        == OmegaConf.to_container(kd)
    # a recipe that chooses its loss itself (ofa) gets its specialisation too
    assert make_cfg(["recipe=fmnist_ofa_hetero"]).loss.head_blocks == 1
    assert "head_blocks" not in make_cfg(["recipe=fmnist_ofa_hetero", "loss=kd"]).loss
    assert make_cfg(["recipe=fmnist_bench", "loss=ofa"]).loss.head_blocks == "auto"
    assert make_cfg(["loss=ofa"]).loss.head_blocks == "auto"
    for overrides in ([], ["loss=dkd"], ["recipe=quickstart", "loss=dkd"]):
        cfg = make_cfg(overrides)
        assert "loss_options" not in cfg and "recipe_loss" not in cfg


def test_every_recipe_loss_names_a_recipe_and_a_loss():
    # an `optional` entry that matches nothing is silently skipped: a misnamed file would be too
    losses = {p.stem for p in (Path(CONF_DIR) / "loss").glob("*.yaml")}
    specials = sorted((Path(CONF_DIR) / "recipe_loss").glob("*.yaml"))
    assert specials
    for path in specials:
        assert any(path.stem == f"{recipe}_{loss}" for recipe in RECIPES for loss in losses), \
            path.name
