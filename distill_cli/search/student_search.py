"""`distill-search`: DisWOT training-free student search for a teacher (METHODS.md "DisWOT").

    search(cfg, run_dir, tty) — cfg composed from conf/search.yaml (= conf/config.yaml + `search`)

1. validate `search.*` and build every candidate (a bad one is a UserError naming
   `search.candidates[i]`) before anything expensive;
2. take ONE seeded training batch of `search.batch_size`;
3. score every candidate against the teacher at random init (distill_cli/evaluation/diswot.py:
   D_sem from the final FC's gradient, D_rel on the map that is pooled into it): the teacher
   is Gaussian re-initialised too (`search.teacher_weights: random`, the paper's protocol), or
   used with its trained weights from the usual teacher resolution (`trained`);
4. rank by score (higher = more similar), print a table with params, MACs, D_sem, D_rel, score
   and wall time, write `search.json` + `search.md` into the run dir;
5. with `search.train=true` distil each of the `top_k` best with a normal run (`loss`, KD T 4 /
   CE 0.1 / KD 0.9 by default) into `<run_dir>/train/<rank>_<arch>`.
"""
from __future__ import annotations

import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from distill_cli import keys
from distill_cli.config.build import build_data, build_model, model_node
from distill_cli.seeding import derive_seed
from distill_cli.evaluation.diswot import combine, init_seed, penultimate_width, probe_network
from distill_cli.errors import UserError
from distill_cli.models.cost import count_macs, count_params
from distill_cli.search.report import print_table, write_result
from distill_cli.teachers.resolve import resolve_teacher
from distill_cli.training.plan import pick_device
from distill_cli.training.run import run
from distill_cli.training.teacher_runs import store_access
from distill_cli.reporting.tracking import ConsoleReporter

MODEL_TARGET = "distill_cli.models.create"
TEACHER_WEIGHTS = ("random", "trained")


# ------------------------------------------------------------------------------ config
def _options(cfg: DictConfig) -> dict:
    s = cfg.get("search")
    if s is None:
        raise UserError("No `search` node in the config", "search",
                        "Run distill-search (its config is conf/search.yaml)")
    opts = {k: s.get(k) for k in ("batch_size", "seed", "semantic", "relation",
                                  "teacher_weights", "top_k", "train")}
    for key in ("batch_size", "top_k"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"search.{key} must be a positive integer, got {v!r}",
                            f"search.{key}", f"Pass e.g. search.{key}=" +
                            ("64" if key == "batch_size" else "1"))
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise UserError(f"search.seed must be an integer, got {opts['seed']!r}", "search.seed",
                        "Pass e.g. search.seed=0")
    if opts["semantic"] not in ("auto", True, False):
        raise UserError(f"search.semantic={opts['semantic']} is not an option",
                        "search.semantic", "Use auto, true or false")
    for key in ("relation", "train"):
        if not isinstance(opts[key], bool):
            raise UserError(f"search.{key} must be true or false, got {opts[key]!r}",
                            f"search.{key}", f"Pass search.{key}=true or false")
    if opts["semantic"] is False and not opts["relation"]:
        raise UserError("search.semantic=false and search.relation=false leave no term to "
                        "score with", "search.relation", "Turn on at least one of them")
    if opts["teacher_weights"] not in TEACHER_WEIGHTS:
        raise UserError(f"search.teacher_weights={opts['teacher_weights']} is not an option",
                        "search.teacher_weights", "Use random (the paper's) or trained")
    return opts


def candidate_nodes(cfg: DictConfig) -> list[DictConfig]:
    """`search.candidates` as student nodes (`_target_` added); shape errors name the entry."""
    cands = cfg.search.get("candidates")
    if not isinstance(cands, ListConfig) or len(cands) == 0:
        raise UserError("search.candidates is empty: nothing to search", "search.candidates",
                        "Pass e.g. 'search.candidates=[{arch: cnn, channels: [8,16,32]}, "
                        "{arch: mlp, hidden: [64]}]'")
    nodes = []
    for i, c in enumerate(cands):
        if not isinstance(c, DictConfig) or not isinstance(c.get("arch"), str):
            raise UserError(f"search.candidates[{i}] = {c!r} is not a student node with an "
                            "`arch`", f"search.candidates[{i}]",
                            "Write each candidate like {arch: cnn, channels: [8,16,32]} (an "
                            "architecture name and its options, as in conf/student/)")
        plain = OmegaConf.to_container(c, resolve=True)
        nodes.append(OmegaConf.create({"_target_": MODEL_TARGET, **plain}))
    return nodes


def describe(node: DictConfig) -> str:
    """`cnn channels=[8, 16, 32]`: the candidate in one line."""
    plain = OmegaConf.to_container(node, resolve=True)
    opts = " ".join(f"{k}={v}" for k, v in plain.items() if k not in ("_target_", "arch"))
    return f"{plain['arch']} {opts}".strip()


def build_candidate(node: DictConfig, i: int, data) -> nn.Module:
    key = f"search.candidates[{i}]"
    try:
        return build_model(node, key, data)
    except UserError as err:
        raise UserError(f"{key} ({describe(node)}): {err.what}", key, err.fix) from None


# ------------------------------------------------------------------------------ the search
def score_batch(data, batch_size: int, seed: int):
    """The one training batch every candidate is scored on (augmented like training)."""
    if data.train.num_batches(batch_size, train=True) == 0:
        raise UserError(f"search.batch_size={batch_size} is larger than the {len(data.train)} "
                        "training examples", "search.batch_size", "Lower search.batch_size")
    return next(iter(data.train.train_batches(batch_size, derive_seed("diswot-batch", seed),
                                              epoch=1)))


def search(cfg: DictConfig, run_dir: str | Path | None = None, tty: bool | None = None) -> dict:
    """Score, rank, report and (with `search.train`) distil the top-k; returns search.json."""

    opts = _options(cfg)
    nodes = candidate_nodes(cfg)
    teacher_node = model_node(cfg.teacher)
    if teacher_node is None:
        raise UserError("distill-search ranks students for a teacher, but teacher=none",
                        "teacher", "Name the teacher architecture, e.g. teacher=cnn")
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    if (run_dir / "search.json").exists():
        raise UserError(f"{run_dir} already holds a search (search.json); refusing to "
                        "overwrite it", "hydra.run.dir",
                        "Choose another hydra.run.dir (the default is a fresh timestamped one)")
    reporter = ConsoleReporter(0, tty=tty)
    started = time.time()

    device = pick_device(cfg.trainer.device)
    data = build_data(cfg.dataset).to(device)
    students = [build_candidate(n, i, data).to(device) for i, n in enumerate(nodes)]
    widths = [penultimate_width(s) for s in students]

    if opts["teacher_weights"] == "trained":
        teacher, teacher_info = resolve_teacher(cfg.teacher, data, device, reporter,
                                                store_access(cfg, data, tty, run))
    else:   # only the architecture matters: it is Gaussian re-initialised like the students
        teacher = build_model(cfg.teacher, "teacher", data).to(device)
        teacher_info = {keys.TEACHER_SOURCE: "random init (Gaussian)"}
    t_width = penultimate_width(teacher)

    semantic, note = _semantic_switch(opts["semantic"], t_width, widths, nodes)
    if not (semantic or opts["relation"]):
        raise UserError("search.relation=false, and D_sem is off because the candidates' "
                        "penultimate widths differ from the teacher's: no term is left",
                        "search.relation", "Pass search.relation=true")
    if note:
        reporter.stage(note)

    seed = int(opts["seed"])
    batch = score_batch(data, int(opts["batch_size"]), seed)
    t0 = time.time()
    t_probe = probe_network(teacher, batch.x, batch.y, seed=init_seed(seed, "teacher")
                            if opts["teacher_weights"] == "random" else None)
    teacher_wall = time.time() - t0
    rows = []
    for i, (node, student) in enumerate(zip(nodes, students)):
        t0 = time.time()
        s_probe = probe_network(student, batch.x, batch.y, seed=init_seed(seed, "student"))
        result = combine(t_probe, s_probe, semantic=semantic, relation=opts["relation"])
        wall = time.time() - t0
        rows.append({"index": i, "arch": node.arch, "candidate": describe(node),
                     "config": OmegaConf.to_container(node, resolve=True),
                     "params": count_params(student),
                     "macs": count_macs(student, data.input_shape, device),
                     "width": widths[i], "d_sem": result.d_sem, "d_rel": result.d_rel,
                     "score": result.score, keys.WALL_S: wall})
    rows.sort(key=lambda r: (-r["score"], r["index"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank

    result = {keys.STATUS: "scored", keys.RUN_DIR: str(run_dir), "dataset": data.name,
              "teacher": {"arch": teacher_node.arch, "config": OmegaConf.to_container(
                  teacher_node, resolve=True), "params": count_params(teacher),
                  "macs": count_macs(teacher, data.input_shape, device), "width": t_width,
                  "weights": opts["teacher_weights"], "probe_wall_s": teacher_wall,
                  **{k.split(keys.SEP, 1)[1]: v for k, v in teacher_info.items()}},
              "batch_size": int(opts["batch_size"]), "seed": seed, "semantic": semantic,
              "relation": opts["relation"], "note": note, "rows": rows, "train": [],
              keys.WALL_S: time.time() - started}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_result(run_dir, result)
    print_table(result, reporter)

    if opts["train"]:
        for row in rows[:int(opts["top_k"])]:
            child_dir = run_dir / "train" / f"{row['rank']}_{row['arch']}"
            reporter.stage(f"distilling rank {row['rank']} ({row['candidate']}) into "
                           f"{child_dir}")
            summary = run(child_config(cfg, row["config"]), child_dir, tty=tty, data=data)
            result["train"].append({"rank": row["rank"], "candidate": row["candidate"],
                                    keys.RUN_DIR: str(child_dir),
                                    keys.STATUS: summary[keys.STATUS],
                                    **{k: summary.get(k) for k in (
                                        keys.BEST_VAL_ACC1, keys.BEST_TEST_ACC1,
                                        keys.LAST_TEST_ACC1, keys.TEACHER_TEST_ACC1,
                                        keys.WALL_S)}})
            write_result(run_dir, result)
        result[keys.STATUS] = "trained"
    else:
        result[keys.STATUS] = "finished"
    result[keys.WALL_S] = time.time() - started
    write_result(run_dir, result)
    if result["train"]:
        print_table(result, reporter)
    return result


def _semantic_switch(mode, t_width: int, widths: list[int], nodes) -> tuple[bool, str]:
    """Resolve `search.semantic`: D_sem needs every candidate's penultimate width C to equal the
    teacher's. auto: off for ALL candidates when any differs (a score with D_sem and one without
    are not comparable); true: a mismatch is an error naming the candidate."""
    if mode is False:
        return False, ""
    bad = [i for i, w in enumerate(widths) if w != t_width]
    if not bad:
        return True, ""
    if mode is True:
        i = bad[0]
        raise UserError(f"search.candidates[{i}] ({describe(nodes[i])}) has penultimate width "
                        f"{widths[i]} but the teacher has {t_width}: D_sem compares C x C "
                        "matrices", f"search.candidates[{i}]",
                        f"Give it a classifier input (penultimate feature) of {t_width}, "
                        "or pass "
                        "search.semantic=auto (drops D_sem when widths differ) / false")
    return False, (f"D_sem off: candidates {', '.join(f'[{i}]' for i in bad)} have a "
                   f"penultimate width other than the teacher's {t_width}; ranking by D_rel only")


def child_config(cfg: DictConfig, student: dict) -> DictConfig:
    """The run config that distils one candidate: this config with the candidate as student and
    no `search` node."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("search", None)
    plain["student"] = dict(student)
    return OmegaConf.create(plain)
