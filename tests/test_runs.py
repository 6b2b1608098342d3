"""What `lmkit plot` plots, decided in lmkit.runs and lmkit.plot: the runs its targets name (found
through Project's layout) and the image's size, with one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmkit import plot, runs
from lmkit.errors import ConfigError, LmkitError
from lmkit.project import Project, run_holding


def test_targets_name_projects_run_folders_and_runs(tiny_project: Project, tmp_path: Path) -> None:
    other = Project(tmp_path / "other")
    shutil.copytree(tiny_project.root, other.root)
    assert [(Path(r.project), r.run) for r in runs.named_runs(tiny_project)] == [(tiny_project.root, "run1")]
    named = runs.named_runs(tiny_project, [str(other.root), str(other.run_dir("run1")), "run1"])
    assert [(Path(r.project).name, r.run) for r in named] == [("other", "run1"), ("other", "run1"),
                                                               (tiny_project.root.name, "run1")]
    with pytest.raises(LmkitError, match="no run 'run9'"):
        runs.named_runs(tiny_project, ["run9"])
    empty = Project.open(tmp_path / "empty")
    empty.runs_dir.mkdir()
    with pytest.raises(ConfigError, match="no runs to plot"):
        runs.named_runs(empty)


def test_a_run_folder_is_known_by_the_project_layout(tiny_project: Project, tmp_path: Path) -> None:
    project, run = run_holding(tiny_project.run_dir("run1"))
    assert (project.root, run) == (tiny_project.root, "run1")
    assert run_holding(tiny_project.run_dir("run9")) is None  # no saved config
    elsewhere = tmp_path / "notruns" / "run1"
    shutil.copytree(tiny_project.run_dir("run1"), elsewhere)
    assert run_holding(elsewhere) is None
    assert tiny_project.has_runs() and not Project(tmp_path / "empty").has_runs()
    assert tiny_project.curves_image() == tiny_project.root / "curves.png"
    assert tiny_project.curves_image("run1") == tiny_project.root / "run1.png"


@pytest.mark.parametrize("text, size", [("900x540", (900, 540)), ("50X10000", (50, 10_000))])
def test_an_image_size_is_width_x_height(text: str, size: tuple[int, int]) -> None:
    assert plot.parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "900", "900x", "1x2x3", "49x100", "100x10001", "-100x100"])
def test_a_bad_image_size_is_one_error_line(text: str) -> None:
    with pytest.raises(ConfigError, match="give WIDTHxHEIGHT in pixels"):
        plot.parse_size(text)
