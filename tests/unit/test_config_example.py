"""burla.toml.example documents every config key, with its real default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from burla.common.config import Config

EXAMPLE = Path(__file__).resolve().parents[2] / "burla.toml.example"


def documented() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            current = header.group(1)
            sections[current] = set()
            continue
        key = re.match(r"^# (\w+) = ", line)
        if key and current:
            sections[current].add(key.group(1))
    return sections


def test_every_config_key_is_in_the_example() -> None:
    config = Config()
    keys = {s.name: {f.name for f in dataclasses.fields(getattr(config, s.name))} for s in dataclasses.fields(config)}
    assert documented() == keys


def test_the_example_loads_when_uncommented(tmp_path: Path) -> None:
    text = re.sub(r"^# (\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.M)
    path = tmp_path / "burla.toml"
    path.write_text(text)
    assert Config.load(path, env={}) == Config()  # the example shows the defaults


def test_every_node_group_key_is_in_the_example_with_its_default(tmp_path: Path) -> None:
    from burla.common.config import NodeGroupConfig

    lines = EXAMPLE.read_text().split("# [[cluster.groups]]\n", 1)[1].splitlines()
    table = [re.sub(r"^#   ", "", line) for line in lines if re.match(r"^#   \w+ = ", line)]
    assert {line.split(" = ")[0] for line in table} == {f.name for f in dataclasses.fields(NodeGroupConfig)}
    path = tmp_path / "burla.toml"
    path.write_text("[[cluster.groups]]\n" + "\n".join(table) + "\n")
    assert Config.load(path, env={}).cluster.groups == [NodeGroupConfig()]
