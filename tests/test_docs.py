"""What the documentation claims, checked: README's test command is the one CI runs, the
configuration reference is generated from the Config dataclasses and up to date, and every
link between README and docs/ leads somewhere."""
from __future__ import annotations

import importlib.util
import re

import yaml

from helpers import REPO

README = REPO / "README.md"
CONFIG_REFERENCE = REPO / "docs" / "config.md"


def generator():
    """docs/gen_config.py, imported from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config", REPO / "docs" / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_command(number: int) -> str:
    """The one-line shell command in the ```bash block after README's "**N. ...**" heading."""
    text = README.read_text()
    heading = re.search(rf"^\*\*{number}\. .*$", text, re.M)
    assert heading, f"README.md has no '**{number}. ...**' heading"
    block = re.search(r"```bash\n(.*?)\n```", text[heading.end():], re.S)
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"README command {number} is not one line: {lines}"
    return lines[0].strip()


def ci_test_command() -> str:
    """The command .ci/run ends with: its last line that is not a comment."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def test_readme_command_2_is_what_ci_runs():
    assert readme_command(2) == ci_test_command(), (
        "README's command 2 and the last line of .ci/run must be the same command: change both")


def test_readme_command_1_runs_the_tiny_config_on_two_ranks():
    command = readme_command(1)
    for part in ("python -m train.prepare --input python-stdlib", "torchrun --nproc_per_node 2",
                 "configs/tiny-clm.yaml", "python -m train.generate"):
        assert part in command, part


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}"


def test_the_config_reference_is_current_and_describes_every_key():
    page, undocumented = generator().reference()
    assert undocumented == [], (f"no description for {undocumented}: add a comment to the field "
                                f"in train/config.py")
    assert CONFIG_REFERENCE.read_text() == page, (
        "docs/config.md is stale: python docs/gen_config.py > docs/config.md")


def yaml_keys(node: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a config file; the values of dict-typed keys (model.config, a DeepSpeed
    JSON) are the key's own business."""
    keys = set()
    for key, value in node.items():
        dotted = prefix + key
        keys.add(dotted)
        if isinstance(value, dict) and dotted not in ("model.config", "model.overrides",
                                                      "deepspeed.config"):
            keys |= yaml_keys(value, dotted + ".")
    return keys


def test_every_key_the_shipped_configs_use_is_in_the_reference():
    text = CONFIG_REFERENCE.read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    sections = set(re.findall(r"^## `([^`]+)`", text, re.M))
    used = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        used |= yaml_keys(yaml.safe_load(path.read_text()))
    assert used - documented - sections == set()
    # the keys that README's tables never covered
    assert {"logging_steps", "num_train_epochs", "per_device_eval_batch_size",
            "data.validation_split", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
            "max_grad_norm", "eval_strategy"} <= documented
