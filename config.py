"""The run configuration: one flat YAML file -> one dataclass.

    python train.py configs/qwen3_1p7b_ibtpo.yaml lr=2e-6 run_dir=runs/try2

Every key is a field of Config below, with its default and meaning. Unknown
keys, values of the wrong type and missing files are errors that name the key
(UserError: train.py prints it as one line, `error: ...`, and exits 2).
Command-line overrides are `key=value`, the value parsed as YAML (so `lam=0.1`,
`chat_template=false`, `eval_sets=[a.jsonl,b.jsonl]`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field

import yaml


STRATEGIES = ("ib", "entropy", "random", "independent")  # tree.STRATEGIES' keys (a test checks), known
                                                          # here so that a config is checked before torch loads


def parse_spec(spec: str) -> tuple[str, str | None, str, str]:
    """An eval set "path_or_id[@split][:question_field:answer_field]" -> (path, split, qfield, afield)."""
    qf = af = "auto"
    if spec.count(":") >= 2:
        spec, qf, af = spec.rsplit(":", 2)
    path, split = spec.rsplit("@", 1) if "@" in spec else (spec, None)
    return path, split, qf or "auto", af or "auto"


class UserError(Exception):
    """A mistake in the config, the data or a path, which the user can fix: reported
    as one line naming the key, file or row, without a traceback."""


@dataclass
class Config:
    # --- model and data (hub ids or local paths; loaded with from_pretrained / load_dataset)
    model: str = ""                      # policy to train: hub id or local folder
    dtype: str = "bfloat16"              # compute dtype: bfloat16 | float16 | float32 (master weights stay float32)
    data: str = ""                       # training questions: hub id, local folder, or .json/.jsonl/.parquet file
    data_subset: str = ""                # hub dataset config name, if any
    data_split: str = "train"
    question_field: str = "auto"         # training data only: "auto" = the first of question / problem / prompt
    answer_field: str = "auto"           # training data only: "auto" = the first of answer / solution / ground_truth / final_answer
    # the verifier reads the last \boxed{}, so the template asks for it; literal braces are written {{}}
    prompt_template: str = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    chat_template: bool = True           # wrap the prompt with the tokenizer's chat template when it has one
    max_prompt_tokens: int = 512         # longer prompts are dropped at load time (counted in the log)
    # --- IBTree sampling (METHOD.md section 4) and the IB-Score (section 3)
    strategy: str = "ib"                 # ib | entropy | random | independent (tree.STRATEGIES)
    B0: int = 4
    L: int = 9
    K: int = 1
    B: int = 1
    beta: float = 5.0
    step_prob: str = "mean"              # DECISION step_prob: mean | joint
    max_step_tokens: int = 512           # cap on one step's length (0: none)
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 20                      # 0 disables
    max_response_tokens: int = 2048
    rollout_engine: str = "decoder"      # decoder: continuous batching (engine.py) | lockstep: one generate per round
    max_rows: int = 256                  # decoder: sequences decoded together per rank; their KV cache is most of
                                         # a GPU's memory (evaluation fills the pool): `python bench.py memory CFG`
    reuse_prefix_kv: bool = True         # decoder: a branch copies its prefix's KV cache from the request that
                                         # generated it instead of prefilling it (memory: growing trees' caches)
    # --- advantages and loss (sections 5, 6)
    lam: float = 0.1                     # weight of A_IB in A = A_GL + lam * A_IB
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.001               # 0 loads no reference model
    loss_agg: str = "token-mean"         # token-mean | seq-mean-token-mean | constant (Dr. GRPO)
    sqrt_leaves: bool = False            # DECISION shared prefixes: divide A(s) by sqrt(leaves below s), as TreeRL
    verifier_timeout: float = 5.0        # CPU seconds of verifier time per answer (reward.py)
    # --- optimisation
    questions_per_step: int = 128        # questions per rollout batch, all ranks together
    updates_per_batch: int = 1           # optimizer steps per rollout batch (mini-batches)
    micro_batch_tokens: int = 16384      # token budget of one forward/backward (prompt + response, padded)
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    # --- run
    steps: int = 0                       # rollout batches to train on; 0 = one epoch of the data
    seed: int = 0
    threads: int = 0                     # torch CPU threads per process (0: torch's default); tiny models: 1
    run_dir: str = "runs/default"
    log_every: int = 1                   # print a metrics line every N steps (the JSON file gets every step)
    save_every: int = 0                  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "true"                 # true: continue run_dir's latest checkpoint if there is one (refused when
                                         # keys other than checkpoint.SAFE_TO_CHANGE differ); false: start afresh
                                         # (refused if run_dir holds checkpoints); force: continue despite changes
    eval_sets: list = field(default_factory=list)  # "path_or_hub_id[@split][:question_field:answer_field]";
                                         # each set finds its own fields by name unless its spec names them
    eval_every: int = 0                  # evaluate every N steps (0: only before and after training)
    eval_k: int = 4                      # avg@k: samples per eval question
    eval_max_questions: int = 0          # 0: all
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_only: bool = False              # score `model` on eval_sets and exit
    dump_trees: int = 1                  # write this many trees of the last step to run_dir/trees.txt

    def check(self) -> None:
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise UserError(f"config: {key} {msg} (got {getattr(self, key)!r})")
        need(bool(self.model), "model", "must name a hub id or a local folder")
        need(bool(self.data) or self.eval_only, "data", "must name a dataset")
        need(self.dtype in ("bfloat16", "float16", "float32"), "dtype", "must be bfloat16, float16 or float32")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {sorted(STRATEGIES)}")
        need(self.step_prob in ("mean", "joint"), "step_prob", "must be mean or joint")
        need(self.rollout_engine in ("decoder", "lockstep"), "rollout_engine", "must be decoder or lockstep")
        need(self.loss_agg in ("token-mean", "seq-mean-token-mean", "constant"), "loss_agg",
             "must be token-mean, seq-mean-token-mean or constant")
        for k in ("B0", "L", "K", "B", "questions_per_step", "updates_per_batch", "micro_batch_tokens",
                  "max_response_tokens", "eval_k", "log_every", "keep_checkpoints", "max_rows"):
            need(getattr(self, k) >= 1, k, "must be >= 1")
        for k in ("threads", "steps", "max_step_tokens", "top_k", "save_every", "eval_every", "warmup_steps", "kl_coef",
                  "weight_decay", "grad_clip", "eval_max_questions", "dump_trees"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        for f in dataclasses.fields(self):
            if f.type in (float, "float"):
                need(math.isfinite(getattr(self, f.name)), f.name, "must be a finite number")
        need(self.beta > 0, "beta", "must be > 0")
        need(0 < self.lr < 1, "lr", "must be in (0, 1): AdamW moves every weight by about lr per step")
        need(self.resume in ("true", "false", "force"), "resume", "must be true, false or force")
        need(self.lam >= 0, "lam", "must be >= 0")
        need(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
        need(0 <= self.eps_high < 1, "eps_high", "must be in [0, 1)")
        need(self.verifier_timeout > 0, "verifier_timeout", "must be > 0 (CPU seconds per answer)")
        need(0 < self.top_p <= 1 and 0 < self.eval_top_p <= 1, "top_p", "and eval_top_p must be in (0, 1]")
        need(self.temperature > 0, "temperature", "must be > 0 for sampling")
        need("{question}" in self.prompt_template, "prompt_template", "must contain {question}")
        try:
            self.prompt_template.format(question="")
        except (IndexError, KeyError, ValueError) as e:
            raise UserError(f"config: prompt_template is not a valid format string ({type(e).__name__}: {e}); "
                             f"write literal braces as {{{{ }}}}, e.g. \\boxed{{{{}}}}") from None
        need(self.updates_per_batch <= self.questions_per_step, "updates_per_batch", "must be <= questions_per_step")
        for key, path in [("model", self.model), ("data", self.data)] + [("eval_sets", parse_spec(s)[0])
                                                                         for s in self.eval_sets]:
            if path and looks_local(path) and not os.path.exists(path):
                hint = "; run `python toy.py prepare` first" if "toy_data" in path else ""
                raise UserError(f"config: {key} {path!r} not found (looked up as a local path: "
                                f"{os.path.abspath(path)}){hint}")


def looks_local(path: str) -> bool:
    """A hub id is "name" or "org/name"; anything else, and an "a/b" whose folder a
    exists here (runs/my_model), is a local path."""
    return (os.path.exists(path) or os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
            or ("/" in path and os.path.isdir(path.split("/")[0]))
            or os.path.splitext(path)[1].lower() in (".json", ".jsonl", ".parquet", ".csv"))


def _coerce(key: str, value, typ):
    """Check a YAML value against the field's type; ints are accepted for floats,
    and so is 1e-6, which YAML 1.1 (PyYAML) reads as a string without a dot."""
    origin = typing.get_origin(typ) or typ
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass  # the error below names the field
    if origin is list and isinstance(value, str):  # a single eval set given as a string
        return [value]
    if origin is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. data_subset: 2024
    if key == "resume" and isinstance(value, bool):
        return str(value).lower()  # true / false, beside force
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise UserError(f"config: {key} must be {origin.__name__}, got {type(value).__name__} {value!r}")
    return value


USAGE = """usage:
  python train.py CONFIG.yaml [key=value ...]                      one process (the CPU, or one GPU)
  torchrun --nproc_per_node=8 train.py CONFIG.yaml [key=value ...]  one node, one process per GPU
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train.py CONFIG.yaml                                          two nodes
  python train.py CONFIG.yaml eval_only=true model=CHECKPOINT/hf run_dir=DIR   score a checkpoint

Overrides are key=value, the value read as YAML: lr=2e-6 chat_template=false eval_sets=[a.jsonl,b.jsonl].
The method and its equation names: METHOD.md. What a run writes and prints: README.md."""


def usage() -> str:
    """USAGE, the recipes in configs/ (their first comment line) and every key with
    its default and the comment beside it in Config."""
    import glob
    import inspect
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    lines = [USAGE, "", "recipes (configs/):"]
    for path in sorted(glob.glob(os.path.join(here, "configs", "*.yaml"))):
        with open(path) as f:
            first = f.readline().lstrip("# ").strip()
        lines.append(f"  {os.path.basename(path):24s} {first}")
    docs, key = {}, None
    for line in inspect.getsource(Config).splitlines():
        field_line = re.match(r" {4}(\w+): [^#]*(?:#\s*(.*))?$", line)
        more = re.match(r" {20,}#\s*(.*)$", line)  # a comment continued below its field
        if field_line:
            key = field_line.group(1)
            docs[key] = field_line.group(2) or ""
        elif more and key:
            docs[key] += " " + more.group(1)
        else:
            key = None
    lines += ["", "keys (default, meaning):"]
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def from_command_line(argv: list[str]) -> Config:
    """train.py's arguments, CONFIG.yaml [key=value ...], as a checked Config; usage on
    --help (exit 0) or with no arguments (exit 2)."""
    if not argv or "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0 if argv else 2)
    path = argv[0] if "=" not in argv[0] else None
    return load_config(path, [a for a in argv if a is not path])


def exit_with(error: UserError) -> None:
    """Print a user's mistake as one line, once (rank 0 under torchrun), and exit 2."""
    import sys
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read the YAML file (if any), apply key=value overrides, validate."""
    raw = {}
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not text (not UTF-8): is it a YAML file?") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of key: value")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"config override must look like key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            raw[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise UserError(f"config override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                            f"quote it, e.g. {k.strip()}='...'") from None
    types = typing.get_type_hints(Config)
    known = [f.name for f in dataclasses.fields(Config)]
    for key in sorted(set(raw) - set(known)):
        near = difflib.get_close_matches(key, known, n=1)
        raise UserError(f"config: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                        + " (the keys and their meaning: config.py)")
    cfg = Config(**{k: _coerce(k, v, types[k]) for k, v in raw.items()})
    cfg.check()
    return cfg


def explained(what: str, spec: str, load):
    """load(spec), with an OSError (not found, no hub access) turned into one line
    that says whether `spec` was taken for a local path or a hub id."""
    try:
        return load(spec)
    except OSError as e:
        where = "local folder" if looks_local(spec) else "not a local path, so a hub id, and the hub lookup failed"
        if not looks_local(spec) and os.environ.get("HF_HUB_OFFLINE") == "1":
            where += " (HF_HUB_OFFLINE is set)"
        text = str(e).strip()
        raise UserError(f"{what} {spec!r}: could not load it ({where}: "
                        f"{text.splitlines()[0][:200] if text else type(e).__name__})") from None


def _yaml_problem(e) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
