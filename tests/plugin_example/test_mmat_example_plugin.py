"""The example plugin's own tests, written with the plugin test kit (``mmat_assets.testing``)
as a third party would: no entry point, no installed package needed."""

from __future__ import annotations

import json

import mmat_example_plugin
from mmat_assets.testing import KitBuild, check_plugin
from mmat_assets.testing import mmat_build  # noqa: F401  (the kit's build fixture)


def test_the_plugin_keeps_its_contracts() -> None:
    assert check_plugin(mmat_example_plugin) == []


def test_the_tool_runs_in_a_small_build_and_its_results_reach_the_dialogues(mmat_build) -> None:  # noqa: F811
    built: KitBuild = mmat_build(plugins=[mmat_example_plugin], rows=2)
    assert built.ok, built.causes
    calls = [c for c in built.tool_calls() if c["tool"] == "mean_colour"]
    assert len(calls) == 2 and all(c["error"] is None and "mean colour" in c["text"] for c in calls)
    rr, orr = built.dialogues("rr"), built.dialogues("orr")
    assert len(rr) == len(orr) == 2
    assert "- mean_colour: Returns the mean RGB colour of the image." in rr[0]["messages"][0]["content"]
    assert all("The mean colour is" in json.dumps(d["messages"]) for d in rr + orr)
