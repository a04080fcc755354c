"""Workspaces named in a URL (data_index.workspace.workspace_from_url): only plain names of
workspaces under the workspace home, never a path."""

from __future__ import annotations

import pytest

from data_index.workspace import Workspace, workspace_from_url
from explorer_core.errors import ExplorerError


def _ws(root):
    return Workspace.create(root, model="demo", layer="layer4.relu_out", images="imgs",
                            input_size=96)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    _ws(home / "good")
    _ws(home / "v1.2_x-y")
    _ws(tmp_path / "outside")  # a complete workspace outside the home
    (home / "escape").symlink_to(tmp_path / "outside")
    (home / "inner").symlink_to(home / "good")  # a link that stays inside the home
    return home


def test_plain_names_under_the_home_open(home):
    assert workspace_from_url("good").root == home / "good"
    assert workspace_from_url("v1.2_x-y").model == "demo"
    assert workspace_from_url("inner").root == (home / "good")
    with pytest.raises(ExplorerError, match="No workspace at"):
        workspace_from_url("missing")


@pytest.mark.parametrize("value", [
    "/abs/path", "/tmp", "../outside", "..", ".", "./good", "good/", "a/b", "a\\b",
    "good\x00", "\x00", "", None, 7, "~", "~/good", ".hidden", "a..b", "good/../good",
    "g" * 65, " good", "good ", "goo d", "C:\\ws",
])
def test_paths_and_odd_names_are_refused(home, value):
    with pytest.raises(ExplorerError, match="Refused workspace .* from the link: a link may only "
                                            "name a workspace in the workspace home"):
        workspace_from_url(value)


def test_a_link_out_of_the_home_is_refused(home, tmp_path):
    assert Workspace.open(tmp_path / "outside").model == "demo"  # a path still opens directly
    with pytest.raises(ExplorerError, match="'escape' from the link: its folder leads outside"):
        workspace_from_url("escape")
