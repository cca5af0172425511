"""Statements in the README and docs that name a behaviour are checked against the code."""

import argparse
import re
from pathlib import Path

import pandas as pd

from s3prl_stimulus import cli

REPO = Path(__file__).resolve().parents[1]


def command_options(name: str) -> dict:
    parser = argparse.ArgumentParser()
    cli._load(name).add_arguments(parser)
    return {option: action for action in parser._actions for option in action.option_strings}


def test_readme_names_each_commands_format_choices():
    readme = " ".join(REPO.joinpath("README.md").read_text(encoding="utf-8").split())
    stated = {}
    for commands, choices in re.findall(r"((?:`[a-z-]+`(?:, | and )?)+) take `--format ([a-z|]+)`", readme):
        for command in re.findall(r"`([a-z-]+)`", commands):
            stated[command] = tuple(choices.split("|"))
    actual = {name: tuple(command_options(name)["--format"].choices)
              for name in cli.COMMANDS if "--format" in command_options(name)}
    assert stated == actual


def test_report_docs_state_the_real_bootstrap_default():
    text = REPO.joinpath("docs", "corpus_and_reports.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `--bootstrap-unit"))
    default = command_options("report")["--bootstrap-unit"].default
    assert f"resample {default}s (default" in row
    assert f"by_speaker={default == 'speaker'}" in text


def test_report_docs_state_the_csv_precision(tmp_path):
    from s3prl_stimulus.study.reports.tables import Table, write_table

    text = " ".join(REPO.joinpath("docs", "corpus_and_reports.md").read_text(encoding="utf-8").split())
    decimals = int(re.search(r"CSV files hold numbers to (\d+) decimals", text).group(1))
    numbers = pd.DataFrame({"macro_f1": [1 / 3]}, index=pd.Index(["wavlm"], name="upstream"))
    table = Table("t", "t", numbers.astype(str), numbers.astype(str), numbers)
    written = write_table(table, tmp_path)
    value = (tmp_path / "t.csv").read_text().splitlines()[1].split(",")[-1]
    assert any(p.suffix == ".csv" for p in written) and value == f"{1 / 3:.{decimals}f}"
